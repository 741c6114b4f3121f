"""The ``store`` fixture most engine tests share: a real SQLite file in ``tmp_path``, open for the
test. A test module that needs another store (in memory, a given path) defines its own."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent import SQLiteStore


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    async with SQLiteStore(tmp_path / "edgesaga.db") as s:
        yield s
