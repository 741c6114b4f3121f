"""Crash tests: a real agent process (tests/crash/runner.py) is SIGKILLed at chosen points, then
``recover`` runs in a new process. The ledger file the steps fsync shows exactly what executed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agent import DatabaseLocked, JournalEntry, SQLiteStore, WorkflowStatus

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "tests" / "crash" / "runner.py"
WID = "crash-1"
TIMEOUT = 30  # seconds for any one subprocess

pytestmark = pytest.mark.slow


class Agent:
    """Runs the runner script against one database and ledger."""

    def __init__(self, tmp_path: Path) -> None:
        self.db = tmp_path / "agent.db"
        self.ledger = tmp_path / "ledger.txt"
        pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        self.env = {**os.environ, "PYTHONPATH": pythonpath}

    def argv(self, command: str, data: dict[str, Any] | None = None) -> list[str]:
        argv = [
            sys.executable,
            str(RUNNER),
            command,
            "--db",
            str(self.db),
            "--ledger",
            str(self.ledger),
        ]
        if command == "start":
            argv += ["--data", json.dumps(data or {}), "--workflow-id", WID]
        return argv

    def run(
        self, command: str, data: dict[str, Any] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(command, data),
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )

    def finishes(self, command: str, data: dict[str, Any] | None = None) -> dict[str, str]:
        proc = self.run(command, data)
        assert proc.returncode == 0, f"{command} failed ({proc.returncode}):\n{proc.stderr}"
        return json.loads(proc.stdout.strip().splitlines()[-1])["statuses"]

    def dies(self, command: str, data: dict[str, Any] | None = None) -> None:
        proc = self.run(command, data)
        assert proc.returncode == -signal.SIGKILL, (
            f"{command} should have been killed, got {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )

    def start_and_kill_at(self, line: str, data: dict[str, Any]) -> None:
        """Start, wait until the ledger shows ``line`` (the step then sleeps), SIGKILL the process."""
        proc = subprocess.Popen(
            self.argv("start", data),
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + TIMEOUT
            while line not in self.lines():
                assert proc.poll() is None, (
                    f"runner exited early:\n{proc.stderr.read() if proc.stderr else ''}"
                )
                assert time.monotonic() < deadline, f"{line!r} never appeared in the ledger"
                time.sleep(0.02)
            # While it runs, no second agent can drive the database.
            assert SQLiteStore.is_locked(self.db)
            with pytest.raises(DatabaseLocked):
                asyncio.run(SQLiteStore(self.db).open())
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=TIMEOUT)
            if proc.stderr:
                proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL

    def lines(self) -> list[str]:
        if not self.ledger.exists():
            return []
        return self.ledger.read_text(encoding="utf-8").splitlines()

    def journal(self) -> list[JournalEntry]:
        async def read() -> list[JournalEntry]:
            async with SQLiteStore(self.db, readonly=True) as store:
                return await store.journal(WID)

        return asyncio.run(read())

    def record(self) -> Any:
        async def read() -> Any:
            async with SQLiteStore(self.db, readonly=True) as store:
                return await store.load_instance(WID)

        return asyncio.run(read())


def rows(journal: list[JournalEntry]) -> list[tuple[str, str, int, str]]:
    return [(e.phase, e.step, e.attempt, e.outcome) for e in journal]


FORWARD_ALL = [f"step{n}:{what}" for n in range(1, 5) for what in ("start", "done")]


def test_killed_inside_step3_resumes_at_step3(tmp_path: Path) -> None:
    agent = Agent(tmp_path)
    agent.start_and_kill_at("step3:start", {"block_at": "Step3"})
    record = agent.record()
    assert record.status is WorkflowStatus.ACTIVE
    assert record.current_step == "Step3"
    assert rows(agent.journal())[-1] == ("forward", "Step3", 1, "started")

    assert agent.finishes("recover") == {WID: "COMPLETED"}
    assert agent.lines() == [
        "step1:start",
        "step1:done",
        "step2:start",
        "step2:done",
        "step3:start",  # killed here
        "step3:start",
        "step3:done",
        "step4:start",
        "step4:done",
    ]
    assert rows(agent.journal()) == [
        ("forward", "Step1", 1, "completed"),
        ("forward", "Step2", 1, "completed"),
        ("forward", "Step3", 1, "interrupted"),
        ("forward", "Step3", 2, "completed"),
        ("forward", "Step4", 1, "completed"),
    ]
    assert agent.record().state["done"] == ["Step1", "Step2", "Step3", "Step4"]
    # Nothing left to recover: a further restart runs nothing.
    assert agent.finishes("recover") == {}
    assert len(agent.lines()) == 9


def test_killed_inside_a_compensation_resumes_the_rollback(tmp_path: Path) -> None:
    agent = Agent(tmp_path)
    agent.dies("start", {"fail_at": "Step4", "comp_kill_at": "Step2"})
    assert agent.lines() == [
        *FORWARD_ALL[:6],
        "step4:start",
        "comp3:start",
        "comp3:done",
        "comp2:start",
    ]
    assert agent.record().status is WorkflowStatus.COMPENSATING

    assert agent.finishes("recover") == {WID: "FAILED_ROLLED_BACK"}
    assert agent.lines() == [
        *FORWARD_ALL[:6],
        "step4:start",
        "comp3:start",
        "comp3:done",
        "comp2:start",  # killed here
        "comp2:start",
        "comp2:done",
        "comp1:start",
        "comp1:done",
    ]
    assert rows(agent.journal()) == [
        ("forward", "Step1", 1, "completed"),
        ("forward", "Step2", 1, "completed"),
        ("forward", "Step3", 1, "completed"),
        ("forward", "Step4", 1, "failed"),
        ("compensate", "Step3", 1, "completed"),
        ("compensate", "Step2", 1, "interrupted"),
        ("compensate", "Step2", 2, "completed"),
        ("compensate", "Step1", 1, "completed"),
    ]
    assert agent.record().state["undone"] == ["Step3", "Step2", "Step1"]


def test_killed_between_create_and_step1(tmp_path: Path) -> None:
    agent = Agent(tmp_path)
    agent.dies("start", {"kill_after_create": True})
    assert agent.lines() == []
    record = agent.record()
    assert record is not None
    assert record.status is WorkflowStatus.ACTIVE
    assert record.current_step == "Step1"
    # step 1's start commits with the instance (one commit fewer per workflow), so a kill right
    # after create leaves that attempt started; nothing of the step ran
    assert rows(agent.journal()) == [("forward", "Step1", 1, "started")]

    assert agent.finishes("recover") == {WID: "COMPLETED"}
    assert agent.lines() == FORWARD_ALL
    assert [e.outcome for e in agent.journal()] == ["interrupted"] + ["completed"] * 4


def test_step_that_kills_every_execution_ends_after_max_interrupts(tmp_path: Path) -> None:
    agent = Agent(tmp_path)
    agent.dies("start", {"kill_always_at": "Step3"})  # execution 1
    restarts = 0
    while True:
        restarts += 1
        assert restarts <= 5, "crash loop: recover keeps executing the step"
        proc = agent.run("recover")
        if proc.returncode == 0:
            statuses = json.loads(proc.stdout.strip().splitlines()[-1])["statuses"]
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr
    # Executions 2 and 3 died in restarts 1 and 2; restart 3 does not run the step again.
    assert restarts == 3
    assert statuses == {WID: "FAILED_ROLLED_BACK"}
    lines = agent.lines()
    assert lines.count("step3:start") == 3
    assert "step3:done" not in lines
    assert "step4:start" not in lines
    # Its own compensation first (it may have taken effect), then the earlier ones.
    assert lines[lines.index("comp3:start") :] == [
        "comp3:start",
        "comp3:done",
        "comp2:start",
        "comp2:done",
        "comp1:start",
        "comp1:done",
    ]
    assert rows(agent.journal()) == [
        ("forward", "Step1", 1, "completed"),
        ("forward", "Step2", 1, "completed"),
        ("forward", "Step3", 1, "interrupted"),
        ("forward", "Step3", 2, "interrupted"),
        ("forward", "Step3", 3, "interrupted"),
        ("compensate", "Step3", 1, "completed"),
        ("compensate", "Step2", 1, "completed"),
        ("compensate", "Step1", 1, "completed"),
    ]
    record = agent.record()
    assert record.status is WorkflowStatus.FAILED_ROLLED_BACK
    assert "max_interrupts" in (record.error or "")
    # And it stays ended.
    assert agent.finishes("recover") == {}
    assert agent.lines() == lines
