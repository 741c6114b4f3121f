"""One agent per database file, whatever name it is opened by (issue 10, finding 4).

The lock is taken on the database file itself, so a symbolic link to the file, a symbolic link to
its directory or a hard link reaches the same lock as the file's own name.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from agent import DatabaseLocked, SQLiteStore
from tests.flows.service.harness import ROOT, base_env

PAYMENT_DATA = '{"order_id": "O1", "customer_id": "C1", "amount": 1.0}'


def _symlink(real: Path) -> Path:
    alias = real.parent / "alias.db"
    alias.symlink_to(real.name)
    return alias


def _hardlink(real: Path) -> Path:
    other = real.parent / "other"
    other.mkdir()
    alias = other / "hard.db"
    os.link(real, alias)
    return alias


def _linked_directory(real: Path) -> Path:
    linked = real.parent.parent / "linked-dir"
    linked.symlink_to(real.parent, target_is_directory=True)
    return linked / real.name


ALIASES: dict[str, Callable[[Path], Path]] = {
    "symlink to the file": _symlink,
    "hard link": _hardlink,
    "symlink to its directory": _linked_directory,
}


@pytest.mark.parametrize("make_alias", ALIASES.values(), ids=ALIASES.keys())
async def test_a_second_store_through_another_name_of_the_file_is_locked_out(
    tmp_path: Path, make_alias: Callable[[Path], Path]
) -> None:
    (tmp_path / "state").mkdir()
    real = tmp_path / "state" / "fish.db"
    async with SQLiteStore(real) as first:
        alias = make_alias(real)
        assert SQLiteStore.is_locked(alias)
        second = SQLiteStore(alias)
        with pytest.raises(DatabaseLocked, match="Another edgesaga process already drives"):
            await second.open()
        assert not second.is_open
        assert await first.ping()  # the first one is untouched
    assert not SQLiteStore.is_locked(alias)
    async with SQLiteStore(alias) as again:  # released: the alias opens now
        assert await again.ping()


async def test_the_cli_refuses_to_write_through_a_symlink_while_the_file_is_driven(
    tmp_path: Path,
) -> None:
    real = tmp_path / "fish.db"
    async with SQLiteStore(real) as store:
        alias = _symlink(real)
        argv = ["start", "PaymentProcessing", "--data", PAYMENT_DATA, "--db", str(alias)]
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "agent._cli", *argv],
            cwd=ROOT,
            env=base_env(),
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        assert result.returncode == 2, (result.stdout, result.stderr)
        assert "Another edgesaga process already drives" in result.stderr
        assert "Traceback" not in result.stderr
        assert await store.list_instances() == []  # nothing was started beside the driver
