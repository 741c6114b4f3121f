"""What the ``edgesaga`` command says when the file system is in its way: one sentence naming the
path and what to do, never a traceback (issue 10 #13), and a control socket it may not open is a
permission problem, not "no agent" (issue 10 #14).

Each case runs the real command in a subprocess against a real SQLite file. When the tests run as
root, that subprocess drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH first, so file modes bind it
as they bind any other user (root would read and write through them).
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.flows.service.harness import (
    ROOT,
    SERVICE_DEFS,
    AgentProcess,
    agent_process,
    base_env,
    write_config,
)

PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2


def _like_any_user() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes a root process obey file modes (None when not root)."""
    if os.geteuid() != 0:
        return None

    def drop() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
            if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")

    return drop


def edgesaga(*args: str, stdout: int | None = None) -> subprocess.CompletedProcess[str]:
    """``edgesaga ARGS`` as a user bound by file modes; the finished process."""
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        cwd=ROOT,
        env=base_env(),
        stdout=subprocess.PIPE if stdout is None else stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=30,
        check=False,
        preexec_fn=_like_any_user(),  # runs between fork and exec: it only calls prctl
    )


def one_sentence(result: subprocess.CompletedProcess[str], *parts: str) -> str:
    """The error line of a refused command; it holds every one of ``parts``."""
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("edgesaga: error: "), line
    for part in parts:
        assert part in line, (part, line)
    return line


def quick_start(db: Path) -> subprocess.CompletedProcess[str]:
    return edgesaga("start", "ServiceQuick", "--definitions", str(SERVICE_DEFS), "--db", str(db))


@pytest.fixture
def database(tmp_path: Path) -> Iterator[Path]:
    """A database holding one COMPLETED workflow; its directory is made writable again after."""
    db = tmp_path / "state" / "edgesaga.db"
    assert quick_start(db).returncode == 0
    yield db
    db.parent.chmod(0o755)
    for f in db.parent.iterdir():
        f.chmod(0o644)


def _leave_wal_files(db: Path, mode: int = 0o644, *, change: bool = False) -> None:
    """Leave ``db-wal`` and ``db-shm`` behind with ``mode``, as an agent that still runs (or was
    killed) does: a process opens the database (``change``: and commits a change, which then lives
    only in the -wal file) and exits without closing it."""
    code = (
        "import os, sqlite3, sys\n"
        "c = sqlite3.connect(sys.argv[1]); c.execute('PRAGMA wal_autocheckpoint = 0')\n"
        "c.execute('SELECT count(*) FROM instances').fetchall()\n"
        "if sys.argv[3] == '1':\n"
        "    c.execute(\"INSERT OR REPLACE INTO meta(key, value) VALUES ('test', '1')\"); c.commit()\n"
        "os.chmod(sys.argv[1] + '-wal', int(sys.argv[2])); os.chmod(sys.argv[1] + '-shm', int(sys.argv[2]))\n"
        "os._exit(0)\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(db), str(mode), "1" if change else "0"],
        check=True,
        timeout=30,
    )
    assert (db.parent / (db.name + "-shm")).exists()


# ------------------------------------------------------------------------------------------------
# #13: the database


def test_start_on_a_database_whose_wal_files_it_may_not_write(database: Path) -> None:
    _leave_wal_files(database, 0o444)
    one_sentence(quick_start(database), str(database), "may not write", "sudo -u edgesaga")


def test_start_on_a_read_only_database_file(database: Path) -> None:
    database.chmod(0o444)
    one_sentence(quick_start(database), str(database), "Permission denied")


def test_start_in_a_directory_it_may_not_write(database: Path) -> None:
    database.parent.chmod(0o555)  # SQLite cannot create the -wal and -shm files beside it
    one_sentence(quick_start(database), str(database), "may not write", "sudo -u edgesaga")


def test_start_where_no_database_can_be_created(tmp_path: Path) -> None:
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o555)
    one_sentence(quick_start(locked / "edgesaga.db"), str(locked / "edgesaga.db"), "Permission")


def test_database_under_proc(tmp_path: Path) -> None:
    config = write_config(tmp_path, database="/proc/x.db")
    one_sentence(
        edgesaga("start", "ServiceQuick", "--config", str(config)),
        "/proc/x.db",
        "No such file or directory",
    )


def test_list_and_show_in_a_read_only_directory_read_the_database(database: Path) -> None:
    assert sorted(p.name for p in database.parent.iterdir()) == ["edgesaga.db"]  # closed cleanly
    database.parent.chmod(0o555)  # no -shm file can be made: SQLite alone would refuse to read
    rows = edgesaga("list", "--json", "--db", str(database))
    assert rows.returncode == 0, rows.stderr
    (listed,) = json.loads(rows.stdout)
    assert (listed["workflow_type"], listed["status"]) == ("ServiceQuick", "COMPLETED")
    shown = edgesaga("show", listed["workflow_id"], "--db", str(database))
    assert shown.returncode == 0, shown.stderr
    assert "status      COMPLETED" in shown.stdout


def test_list_in_a_read_only_directory_with_changes_it_cannot_read(database: Path) -> None:
    """A -wal file with changes but no -shm beside it (the agent was killed, the -shm removed):
    reading the database file alone would lose those changes, so the command says why it stops."""
    _leave_wal_files(database, change=True)
    assert (database.parent / (database.name + "-wal")).stat().st_size > 0
    (database.parent / (database.name + "-shm")).unlink()
    database.parent.chmod(0o555)
    one_sentence(edgesaga("list", "--db", str(database)), str(database), "sudo")


@pytest.mark.parametrize("command", ["list", "show", "start"])
def test_db_naming_a_directory(tmp_path: Path, command: str) -> None:
    args = {
        "list": ["list"],
        "show": ["show", "some-id"],
        "start": ["start", "ServiceQuick", "--definitions", str(SERVICE_DEFS)],
    }[command]
    one_sentence(
        edgesaga(*args, "--db", str(tmp_path)),
        f"{tmp_path} is a directory",
        str(tmp_path / "edgesaga.db"),
    )


def test_control_socket_that_is_a_regular_file(tmp_path: Path) -> None:
    taken = tmp_path / "control.sock"
    taken.write_text("not a socket\n")
    config = write_config(
        tmp_path, control_socket=str(taken), logging={"level": "WARNING", "format": "text"}
    )
    one_sentence(
        edgesaga("run", "--config", str(config)), str(taken), "is not a socket", "control_socket"
    )
    assert taken.read_text() == "not a socket\n"  # left alone


def test_output_into_a_closed_pipe_ends_quietly(database: Path) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `| head` that has read its lines: every write gets EPIPE
    try:
        result = edgesaga("list", "--db", str(database), stdout=write_end)
    finally:
        os.close(write_end)
    assert result.stderr == ""
    assert result.returncode == 0


# ------------------------------------------------------------------------------------------------
# #14: the control socket


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    directory = tmp_path_factory.mktemp("socket-perm")
    with agent_process(write_config(directory), test_hooks=False) as running:
        running.wait_ready()
        yield running


@pytest.mark.parametrize(
    "args",
    [("list",), ("show", "x"), ("pins",), ("start", "ServiceQuick"), ("cancel", "x")],
    ids=lambda a: a[0],
)
def test_a_socket_it_may_not_open_is_a_permission_problem(
    agent: AgentProcess, args: tuple[str, ...]
) -> None:
    agent.socket_path.chmod(0o000)  # like a user outside the agent's group (socket 0660)
    try:
        result = edgesaga(*args, "--config", str(agent.config))
    finally:
        agent.socket_path.chmod(0o660)
    line = one_sentence(result, str(agent.socket_path), "permission", "group", "sudo")
    assert "No agent" not in line
    assert result.stdout == ""  # nothing read from the database behind the agent's back
    assert agent.request("status")["ok"] is True
