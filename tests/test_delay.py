"""The DELAY step (DESIGN §11) on a real SQLite file, with an injected clock: its timer is armed in
the step's commit, the workflow waits parked with the timer service (no task), a restart rebases
the timer and waits what is left (never less), and a deadline that passed while the agent was down
is decided by ``on_late``."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml
from _engine_fixtures import ROOT  # noqa: F401  (puts the repository on sys.path)
from _timer_agent import Agent, recover

from agent import SQLiteStore, WorkflowBuilder, WorkflowStatus
from agent import _saga as saga
from agent._clock import FakeClock, TimerMark, arm, read_clock

S = WorkflowStatus
STEPS = "tests.flows.core.steps"
MODEL = "tests.flows.core.models.FlowState"
DAY = 86_400.0


def st(name: str, undo: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "function": f"{STEPS}.do"}
    if undo:
        out["compensate_function"] = f"{STEPS}.undo"
    return out


def write(tmp_path: Path, delay: dict[str, Any], *, saga_mode: bool = True) -> Path:
    path = tmp_path / "flow.yaml"
    body = {
        "workflow_type": "Soak",
        "workflow_version": "1.0.0",
        "initial_state_model": MODEL,
        "saga_mode": saga_mode,
        "steps": [st("A"), {"name": "Wait", "type": "DELAY", **delay}, st("B")],
    }
    path.write_text(yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
    return path


async def stored_timer(store: SQLiteStore, wid: str) -> TimerMark | None:
    rec = await store.load_instance(wid)
    assert rec is not None
    return saga.Progress.from_json(rec.progress).timer


async def start_waiting(
    tmp_path: Path, store: SQLiteStore, clock: FakeClock, delay: dict[str, Any]
) -> tuple[Agent, str]:
    agent = await Agent(write(tmp_path, delay), clock).start(store)
    wf = await agent.builder.create_workflow("Soak", {}, store=store)
    assert await wf.run() is S.ACTIVE
    return agent, wf.id


async def test_a_delay_arms_its_timer_in_the_commit_and_waits_parked(
    tmp_path: Path, store: SQLiteStore
) -> None:
    clock = FakeClock()
    agent, wid = await start_waiting(tmp_path, store, clock, {"duration": 3})
    mark = await stored_timer(store, wid)
    assert mark == arm(read_clock(clock), 3)
    assert agent.timers.count() == 1
    assert agent.timers.count_waiting_on_sync() == 0
    wait = agent.timers.waits(wid)
    assert wait is not None
    assert 2.5 < wait <= 3.0
    # Nothing holds the workflow while it waits: no task, and not even its object.
    assert agent.builder.live(wid) is None
    rec = await store.load_instance(wid)
    assert rec is not None
    assert rec.current_step == "Wait"
    assert rec.state["ledger"] == ["A"]
    await agent.stop()


async def test_a_due_delay_goes_on_and_leaves_no_timer_in_the_progress(
    tmp_path: Path, store: SQLiteStore
) -> None:
    clock = FakeClock()
    agent, wid = await start_waiting(tmp_path, store, clock, {"duration": 3})
    wf = await agent.builder.load_workflow(wid, store)
    clock.advance(2.9)
    assert await wf.run() is S.ACTIVE  # not yet: parked again with what is left
    wait = agent.timers.waits(wid)
    assert wait is not None
    assert wait <= 0.1 + 1e-9
    clock.advance(0.1)
    assert await wf.run() is S.COMPLETED
    assert wf.state.ledger == ["A", "B"]
    rec = await store.load_instance(wid)
    assert rec is not None
    assert "timer" not in rec.progress
    assert agent.timers.count() == 0
    await agent.stop()


@pytest.mark.parametrize("wall_jump", [0.0, DAY, -DAY])
async def test_a_3_s_delay_interrupted_at_1_s_waits_2_s_after_the_restart(
    tmp_path: Path, store: SQLiteStore, wall_jump: float
) -> None:
    clock = FakeClock()
    first, wid = await start_waiting(tmp_path, store, clock, {"duration": 3})
    await first.stop()  # the agent dies at 1 s; the wall clock jumps in between
    clock.advance(1.0)
    clock.jump_wall(wall_jump)
    second = await Agent(write(tmp_path, {"duration": 3}), clock).start(store)
    assert await recover(second, store) == []  # parked, not handed to the runner
    wait = second.timers.waits(wid)
    assert wait is not None
    assert wait == pytest.approx(2.0, abs=0.1)  # 2 s left of 3: not the full 3 s again, not 1 s
    mark = await stored_timer(store, wid)
    assert mark is not None
    assert mark.since == clock.boottime()
    wf = await second.builder.load_workflow(wid, store)
    assert await wf.run() is S.ACTIVE  # never immediately
    clock.advance(2.0)
    assert await wf.run() is S.COMPLETED
    assert wf.state.ledger == ["A", "B"]
    await second.stop()


async def test_after_a_reboot_unsynchronized_it_waits_at_least_the_remaining_time(
    tmp_path: Path, store: SQLiteStore
) -> None:
    clock = FakeClock()
    first, wid = await start_waiting(tmp_path, store, clock, {"duration": 3})
    clock.advance(1.0)
    wf = await first.builder.load_workflow(wid, store)
    assert await wf.run() is S.ACTIVE
    await first.stop()
    clock.reboot(wall=0.0, synchronized=False)  # booted into 1970
    second = await Agent(write(tmp_path, {"duration": 3}), clock).start(store)
    assert await recover(second, store) == []
    wait = second.timers.waits(wid)
    assert wait is not None
    assert 2.9 < wait <= 3.0
    assert second.timers.count_waiting_on_sync() == 1  # the sync would let its wall time rule
    wf = await second.builder.load_workflow(wid, store)
    clock.advance(2.5)
    assert await wf.run() is S.ACTIVE
    clock.advance(0.5)
    assert await wf.run() is S.COMPLETED
    await second.stop()


@pytest.mark.parametrize(
    ("on_late", "status"), [("run", S.COMPLETED), ("fail", S.FAILED_ROLLED_BACK)]
)
async def test_synchronized_at_both_ends_and_long_past_on_late_decides(
    tmp_path: Path, store: SQLiteStore, on_late: str, status: WorkflowStatus
) -> None:
    clock = FakeClock()
    delay = {"duration": 3, "on_late": on_late}
    first, wid = await start_waiting(tmp_path, store, clock, delay)
    await first.stop()
    clock.reboot(wall=clock.wall() + DAY, synchronized=True)
    second = await Agent(write(tmp_path, delay), clock).start(store)
    handed = await recover(second, store)
    assert [wf.id for wf in handed] == [wid]  # due (late) at once: driven, not parked
    wf = handed[0]
    assert await wf.run() is status
    if on_late == "run":
        assert wf.state.ledger == ["A", "B"]
    else:
        assert wf.progress.compensated == ("A",)
        assert wf.error is not None
        assert "late" in wf.error
        assert "on_late is fail" in wf.error
    await second.stop()


async def test_a_cancel_of_a_waiting_workflow_rolls_back_and_its_timer_fires_nothing(
    tmp_path: Path, store: SQLiteStore
) -> None:
    clock = FakeClock()
    agent, wid = await start_waiting(tmp_path, store, clock, {"duration": 0.05})
    wf = await agent.builder.load_workflow(wid, store)
    assert await wf.cancel() is S.CANCELLED
    assert wf.progress.compensated == ("A",)
    assert wf.progress.timer is None
    clock.advance(1.0)
    await asyncio.sleep(0.2)  # the service's wake-up for it comes and goes
    assert agent.submitted == []
    await agent.stop()


async def test_until_before_the_sync_waits_on_the_sync_then_for_its_time(
    tmp_path: Path, store: SQLiteStore
) -> None:
    clock = FakeClock(wall=1_800_000_000.0, synchronized=False)  # 2027-01-15T08:00:00Z
    delay = {"until": "09:00", "timezone": "UTC"}
    agent, wid = await start_waiting(tmp_path, store, clock, delay)
    assert await stored_timer(store, wid) is None  # no wall time to arm it on yet
    assert agent.timers.count_waiting_on_sync() == 1
    assert agent.timers.waits(wid) is None
    clock.set(synchronized=True)
    wf = await agent.builder.load_workflow(wid, store)
    assert await wf.run() is S.ACTIVE
    mark = await stored_timer(store, wid)
    assert mark is not None
    assert mark.needs_sync
    assert mark.wall_deadline == 1_800_003_600.0
    wait = agent.timers.waits(wid)
    assert wait is not None
    assert 3599 < wait <= 3600
    assert agent.timers.count_waiting_on_sync() == 0
    clock.advance(3600)
    assert await wf.run() is S.COMPLETED
    await agent.stop()


async def test_the_service_wakes_the_due_workflow_and_hands_it_over(
    tmp_path: Path, store: SQLiteStore
) -> None:
    clock = FakeClock()
    agent, wid = await start_waiting(tmp_path, store, clock, {"duration": 0.05})
    clock.advance(0.05)
    for _ in range(200):
        if agent.submitted:
            break
        await asyncio.sleep(0.01)
    assert [wf.id for wf in agent.submitted] == [wid]
    assert await agent.submitted[0].run() is S.COMPLETED
    await agent.stop()


async def test_the_service_wakes_sync_waiters_when_the_sync_file_appears(
    tmp_path: Path, store: SQLiteStore
) -> None:
    clock = FakeClock(synchronized=False)
    agent, wid = await start_waiting(tmp_path, store, clock, {"until": "09:00"})
    agent.timers.sync_poll = 0.02
    agent.timers.watch_sync(wid)  # wakes the task, which now polls every 0.02 s
    await asyncio.sleep(0.1)
    assert agent.submitted == []  # not before the sync
    clock.set(synchronized=True)
    for _ in range(200):
        if agent.submitted:
            break
        await asyncio.sleep(0.01)
    assert [wf.id for wf in agent.submitted] == [wid]
    await agent.stop()


async def test_without_a_timer_service_the_driver_waits_in_process(
    tmp_path: Path, store: SQLiteStore
) -> None:
    builder = WorkflowBuilder([write(tmp_path, {"duration": 0.05})])
    wf = await builder.start_workflow("Soak", {}, store=store)
    assert wf.status is S.COMPLETED
    assert wf.state.ledger == ["A", "B"]
