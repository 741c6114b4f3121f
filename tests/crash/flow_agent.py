"""A test's handle on tests/crash/flow_runner.py: one database, one ledger, and the files beside the
ledger that steer the steps of tests/flows/crashflow (hold, fail, after); run the runner to its
end, or start it and SIGKILL it at a line of the ledger or once the journal shows a step done."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent import InstanceRecord, JournalEntry, OutboxItem, SQLiteStore

ROOT = Path(__file__).resolve().parents[2]
RUNNER = ROOT / "tests" / "crash" / "flow_runner.py"
TIMEOUT = 30  # seconds for any one subprocess
HELD = "runner:held"  # the runner's line once it holds (see flow_runner --hold)


class FlowAgent:
    """Runs the flow runner against one database and ledger in ``tmp_path``."""

    def __init__(self, tmp_path: Path, workflow_type: str, workflow_id: str = "flow-1") -> None:
        self.dir = tmp_path
        self.db = tmp_path / "agent.db"
        self.ledger = tmp_path / "ledger.txt"
        self.type = workflow_type
        self.id = workflow_id
        pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        self.env = {**os.environ, "PYTHONPATH": pythonpath}

    # -- steering files (see tests/flows/crashflow/steps.py) ---------------------------------------
    def hold(self, step: str) -> None:
        """``step``'s first execution waits until :meth:`release`."""
        (self.dir / f"hold-{step}").touch()

    def hold_undo(self, step: str) -> None:
        """``step``'s compensation's first execution waits (until the process is killed)."""
        (self.dir / f"hold-undo-{step}").touch()

    def release(self, step: str) -> None:
        (self.dir / f"hold-{step}").unlink(missing_ok=True)

    def fail(self, step: str, on: bool = True) -> None:
        """``step`` raises while this is on."""
        path = self.dir / f"fail-{step}"
        if on:
            path.touch()
        else:
            path.unlink(missing_ok=True)

    def fail_once(self, step: str) -> None:
        """``step``'s next execution raises; the ones after it do not."""
        (self.dir / f"fail-once-{step}").touch()

    def after(self, step: str, line: str) -> None:
        """``step`` waits until ``line`` is in the ledger."""
        (self.dir / f"after-{step}").write_text(line + "\n", encoding="utf-8")

    # -- the runner ----------------------------------------------------------------------------------
    def argv(self, command: str, *extra: str, data: dict[str, Any] | None = None) -> list[str]:
        argv = [sys.executable, str(RUNNER), command, "--db", str(self.db)]
        argv += ["--ledger", str(self.ledger)]
        if command == "start":
            argv += ["--type", self.type]
        if command != "recover":
            argv += ["--workflow-id", self.id]
        if data is not None:
            argv += ["--data", json.dumps(data)]
        return [*argv, *extra]

    def run(
        self, command: str, *extra: str, data: dict[str, Any] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(command, *extra, data=data),
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )

    def answer(self, command: str, *extra: str, data: dict[str, Any] | None = None) -> Any:
        """Run to the end; the runner's JSON line."""
        proc = self.run(command, *extra, data=data)
        assert proc.returncode == 0, f"{command} failed ({proc.returncode}):\n{proc.stderr}"
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def finishes(self, command: str, *extra: str, data: dict[str, Any] | None = None) -> Any:
        """Run to the end; the statuses of the workflows it drove."""
        answer = self.answer(command, *extra, data=data)
        assert "statuses" in answer, answer
        return answer["statuses"]

    def dies(self, command: str, *extra: str, data: dict[str, Any] | None = None) -> None:
        proc = self.run(command, *extra, data=data)
        assert proc.returncode == -signal.SIGKILL, (
            f"{command} should have been killed, got {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
        )

    def kill_when(
        self,
        ready: Callable[[], bool],
        command: str,
        *extra: str,
        data: dict[str, Any] | None = None,
    ) -> None:
        """Start ``command``, wait until ``ready()`` (polled), SIGKILL the process."""
        proc = subprocess.Popen(
            self.argv(command, *extra, data=data),
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + TIMEOUT
            while not ready():
                if proc.poll() is not None:
                    err = proc.stderr.read() if proc.stderr else ""
                    raise AssertionError(f"runner exited early ({proc.returncode}):\n{err}")
                assert time.monotonic() < deadline, "the kill point never came"
                time.sleep(0.02)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=TIMEOUT)
            if proc.stderr:
                proc.stderr.close()
        assert proc.returncode == -signal.SIGKILL

    def kill_at(
        self,
        *lines: str,
        command: str = "start",
        data: dict[str, Any] | None = None,
        extra: tuple[str, ...] = (),
    ) -> None:
        """Start ``command`` and SIGKILL it once every one of ``lines`` is in the ledger."""
        self.kill_when(
            lambda: all(line in self.lines() for line in lines), command, *extra, data=data
        )

    # -- what is on disk ---------------------------------------------------------------------------
    def lines(self) -> list[str]:
        if not self.ledger.exists():
            return []
        return self.ledger.read_text(encoding="utf-8").splitlines()

    def _read(self, what: Callable[[SQLiteStore], Any]) -> Any:
        async def read() -> Any:
            async with SQLiteStore(self.db, readonly=True) as store:
                return await what(store)

        return asyncio.run(read())

    def journal(self) -> list[JournalEntry]:
        return self._read(lambda store: store.journal(self.id))  # type: ignore[no-any-return]

    def record(self) -> InstanceRecord:
        rec = self._read(lambda store: store.load_instance(self.id))
        assert rec is not None, f"no workflow {self.id} in {self.db}"
        return rec  # type: ignore[no-any-return]

    def outbox(self) -> list[OutboxItem]:
        return self._read(lambda store: store.outbox_pending(limit=10_000))  # type: ignore[no-any-return]

    def alerts(self) -> list[dict[str, Any]]:
        return [item.payload for item in self.outbox() if item.kind == "alert"]

    def events(self, name: str) -> list[str | None]:
        """The step of every ``name`` event committed for this workflow, in commit order."""
        return [
            item.payload.get("step")
            for item in self.outbox()
            if item.kind == "event"
            and item.workflow_id == self.id
            and item.payload.get("event") == name
        ]

    def completed_in_journal(self, step: str) -> bool:
        """Is a forward attempt of ``step`` committed as completed? (readable while it runs)"""
        return self.ended_in_journal(step, "completed")

    def ended_in_journal(self, step: str, outcome: str) -> bool:
        """Is a forward attempt of ``step`` committed with ``outcome``? (readable while it runs)"""
        if not self.db.exists():
            return False
        try:
            rows = self.journal()
        except Exception:  # the database is being created
            return False
        return any(e.step == step and e.phase == "forward" and e.outcome == outcome for e in rows)


def rows(journal: list[JournalEntry]) -> list[tuple[str, str, int, str]]:
    return [(e.phase, e.step, e.attempt, e.outcome) for e in journal]


def ran(lines: list[str], line: str) -> int:
    """How many times ``line`` is in the ledger."""
    return lines.count(line)


def undone(lines: list[str]) -> list[str]:
    """The steps compensated, in the order their compensations completed."""
    return [
        line.split(":")[1] for line in lines if line.startswith("undo:") and line.endswith(":done")
    ]
