"""A DELAY in a PARALLEL's branch through a whole agent (DESIGN §10, §11): a TwoBeds-like workflow
whose bed A soaks between opening and closing while bed B is opened beside it. The real ``edgesaga
run`` process is SIGKILLed in the middle of the soak and restarted over the same SQLite file (once
with its wall clock a day ahead, under libfaketime): the run completes once, nothing ran twice,
the soak never ends early, and its timer keeps the deadline it was armed with (it is not restarted
from zero). Times are ``time.monotonic()`` stamps the steps write (the clock the agent's same-boot
rule waits on, never faked); no assertion says how fast anything is."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests._faketime import FakeTime, faketime_lib
from tests.test_time_agent import STEPS, AgentProcess, ended, stamps, wait_for

__all__ = ["faketime_lib"]  # the fixture, imported for pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

SOAK = 5.0  # seconds; the agent is killed 1 s into it

FLOW = """\
workflow_type: TwoBedsSoak
workflow_version: "1.0.0"
initial_state_model: time_steps.TimeState
saga_mode: true
steps:
  - name: Open_Beds
    type: PARALLEL
    branches:
      - - {name: Open_A, function: time_steps.stamp, params: {path: OPEN_A}}
        - {name: Soak_A, type: DELAY, duration: SOAK, on_late: fail}
        - {name: Close_A, function: time_steps.stamp, params: {path: CLOSE_A}}
      - - {name: Open_B, function: time_steps.stamp, params: {path: OPEN_B}}
  - name: After
    function: time_steps.stamp
    params: {path: AFTER}
"""


@pytest.fixture
def beds(tmp_path: Path) -> Iterator[tuple[AgentProcess, dict[str, Path]]]:
    defs = tmp_path / "defs"
    defs.mkdir()
    files = {
        name: tmp_path / f"{name.lower()}.txt" for name in ("OPEN_A", "CLOSE_A", "OPEN_B", "AFTER")
    }
    (tmp_path / "time_steps.py").write_text(STEPS)
    flow = FLOW.replace("SOAK", str(SOAK))
    for name, path in files.items():
        flow = flow.replace(f"path: {name}", f"path: {path}")
    (defs / "two_beds_soak.yaml").write_text(flow)
    agent = AgentProcess(tmp_path, {"definitions": [str(defs)]})
    try:
        yield agent, files
    finally:
        agent.stop()


def soak_timer(agent: AgentProcess, wid: str) -> dict[str, Any] | None:
    """Soak_A's stored timer mark, read from the database file (read-only)."""
    db = agent.tmp / "db" / "edgesaga.db"
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        row = conn.execute("SELECT progress FROM instances WHERE id = ?", (wid,)).fetchone()
    finally:
        conn.close()
    if row is None:
        return None
    mark: dict[str, Any] | None = json.loads(row[0]).get("waits", {}).get("Soak_A")
    return mark


@pytest.mark.parametrize("wall", ["same", "a day ahead"])
def test_a_branch_delay_cut_by_sigkill_completes_once_and_keeps_its_deadline(
    beds: tuple[AgentProcess, dict[str, Path]], tmp_path: Path, faketime_lib: Path, wall: str
) -> None:
    agent, files = beds
    agent.start()
    reply = agent.ask("start", request_id="r1", workflow_type="TwoBedsSoak")
    assert reply is not None
    assert reply["ok"], reply
    wid = reply["workflow_id"]
    opened = wait_for(lambda: stamps(files["OPEN_A"]), 10, "Open_A")[0]
    wait_for(lambda: stamps(files["OPEN_B"]), 10, "Open_B (beside the soak)")
    armed = wait_for(lambda: soak_timer(agent, wid), 10, "Soak_A's timer")
    # Only the soak waits: the workflow holds no worker slot (parked with the timer service).
    wait_for(lambda: (s := agent.ask("status")) is not None and s.get("running") == 0, 10, "idle")
    agent.kill()
    assert stamps(files["CLOSE_A"]) == []  # killed inside the soak
    env = None
    if wall == "a day ahead":
        fake = FakeTime(faketime_lib, tmp_path)
        fake.set(datetime.now(UTC) + timedelta(days=1))
        env = fake.env()
    agent.start(env)
    done = ended(agent, wid)
    assert done["status"] == "COMPLETED", done
    # Each step ran once: nothing before the cut ran again, and the soak ended once.
    assert [len(stamps(files[n])) for n in ("OPEN_A", "OPEN_B", "CLOSE_A", "AFTER")] == [1] * 4
    closed = stamps(files["CLOSE_A"])[0]
    assert closed - opened >= SOAK  # never early, wall clock a day ahead or not
    steps = sorted(j["step"] for j in done["journal"] if j["outcome"] == "completed")
    assert steps == ["After", "Close_A", "Open_A", "Open_B"]
    # The restart rebased the same timer (same boot: the same boot-time deadline); a timer
    # restarted from zero would have a later one. (No DELAY row: a DELAY runs nothing.)
    assert armed["boottime_deadline"] - armed["since"] == SOAK
    log = agent.log.read_text()
    assert log.count("step_started step=Soak_A") == 1  # armed once, in the first life only
    assert log.count("step_completed step=Soak_A") == 1
