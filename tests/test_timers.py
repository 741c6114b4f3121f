"""The timer service (DESIGN §11) and the HUMAN_INPUT timeout it makes durable, on a real SQLite
file with an injected clock: a restart waits what the timeout has left (never its full time
again, never less), by the boot-time clock whatever the wall does; and many waiting timers cost
the service no wake-ups of their own."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml
from _engine_fixtures import ROOT  # noqa: F401  (puts the repository on sys.path)

from agent import SQLiteStore, WorkflowBuilder, WorkflowStatus, _recovery
from agent._clock import FakeClock
from agent._engine import Workflow

S = WorkflowStatus
STEPS = "tests.flows.core.steps"
MODEL = "tests.flows.core.models.FlowState"


def write(tmp_path: Path, on_timeout: str = "fail") -> Path:
    body = {
        "workflow_type": "Ask",
        "workflow_version": "1.0.0",
        "initial_state_model": MODEL,
        "saga_mode": True,
        "steps": [
            {"name": "A", "function": f"{STEPS}.do", "compensate_function": f"{STEPS}.undo"},
            {
                "name": "Approve",
                "type": "HUMAN_INPUT",
                "input_model": "tests.flows.core.models.Approval",
                "timeout": 10,
                "on_timeout": on_timeout,
            },
            {"name": "B", "function": f"{STEPS}.do"},
        ],
    }
    path = tmp_path / "ask.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
    return path


async def paused(tmp_path: Path, store: SQLiteStore, clock: FakeClock) -> str:
    builder = WorkflowBuilder([write(tmp_path)], clock=clock)
    wf = await builder.create_workflow("Ask", {}, store=store)
    assert await wf.run() is S.PAUSED
    assert wf.progress.timer is not None  # the timeout is a durable mark in the progress
    builder._disarm_pause(wf.id)  # the agent dies
    return wf.id


async def restarted(
    tmp_path: Path, store: SQLiteStore, clock: FakeClock
) -> tuple[WorkflowBuilder, list[str]]:
    builder = WorkflowBuilder([write(tmp_path)], clock=clock)
    expired: list[str] = []
    builder.on_pause_timeout = expired.append
    await builder.start_timers(store, lambda wf: None)
    await builder.rearm_pauses(store)
    return builder, expired


@pytest.mark.parametrize("wall_jump", [0.0, 86_400.0, -86_400.0])
async def test_a_pause_timeout_waits_what_it_has_left_after_a_restart(
    tmp_path: Path, store: SQLiteStore, wall_jump: float
) -> None:
    clock = FakeClock()
    wid = await paused(tmp_path, store, clock)
    clock.advance(4)
    clock.jump_wall(wall_jump)
    builder, expired = await restarted(tmp_path, store, clock)
    assert builder.timers is not None
    wait = builder.timers.waits(wid)
    assert wait is not None
    assert 5.9 < wait <= 6.0  # not the full 10 s again, and not less than what is left
    assert expired == []
    await builder.stop_timers()


async def test_a_pause_whose_timeout_passed_while_down_expires_at_start(
    tmp_path: Path, store: SQLiteStore
) -> None:
    clock = FakeClock()
    wid = await paused(tmp_path, store, clock)
    clock.advance(60)
    builder, expired = await restarted(tmp_path, store, clock)
    for _ in range(200):
        if expired:
            break
        await asyncio.sleep(0.01)
    assert expired == [wid]
    wf: Workflow | None = await builder.expire_pause(store, wid)
    assert wf is not None
    assert await wf.run() is S.FAILED_ROLLED_BACK
    assert wf.progress.timer is None
    await builder.stop_timers()


async def test_after_a_reboot_unsynchronized_the_timeout_waits_its_remaining_time(
    tmp_path: Path, store: SQLiteStore
) -> None:
    clock = FakeClock()
    wid = await paused(tmp_path, store, clock)
    clock.advance(4)
    clock.reboot(wall=0.0, synchronized=False)
    builder, _ = await restarted(tmp_path, store, clock)
    assert builder.timers is not None
    wait = builder.timers.waits(wid)
    assert wait is not None
    assert 9.9 < wait <= 10.0  # its last checkpoint was at arming: at least that, never less
    rec = await store.load_instance(wid)
    assert rec is not None
    assert rec.progress["timer"]["boot_id"] == clock.boot_id()  # the rebase was committed
    await builder.stop_timers()


async def test_input_in_time_clears_the_timer(tmp_path: Path, store: SQLiteStore) -> None:
    clock = FakeClock()
    wid = await paused(tmp_path, store, clock)
    builder, _ = await restarted(tmp_path, store, clock)
    assert builder.timers is not None
    assert builder.timers.count() == 1
    wf = await builder.resume(store, wid, {"approved": True})
    assert builder.timers.count() == 0
    assert wf.progress.timer is None
    assert await wf.run() is S.COMPLETED
    await builder.stop_timers()


async def test_many_far_timers_do_not_wake_the_service(tmp_path: Path, store: SQLiteStore) -> None:
    builder = WorkflowBuilder([write(tmp_path)], clock=FakeClock())
    timers = await builder.start_timers(store, lambda wf: None)
    timers.watch("first", 1000.0)
    await asyncio.sleep(0.05)
    before = timers.wakeups
    for n in range(2000):  # all later than the earliest: none moves the one wake-up
        timers.watch(f"wf-{n}", 2000.0 + n)
    await asyncio.sleep(0.2)
    assert timers.count() == 2001
    assert timers.wakeups == before
    timers.watch("sooner", 0.01)  # an earlier deadline moves it: one wake-up to re-aim, one due
    await asyncio.sleep(0.2)
    assert timers.wakeups - before <= 2
    assert timers.count() == 2001  # "sooner" was due and handed over (it is no workflow: skipped)
    timers.forget("first")
    assert timers.count() == 2000
    assert timers.next_wait() is not None
    await builder.stop_timers()


async def test_stop_ends_the_service_task(tmp_path: Path, store: SQLiteStore) -> None:
    builder = WorkflowBuilder([write(tmp_path)], clock=FakeClock())
    timers = await builder.start_timers(store, lambda wf: None)
    task: Any = timers._task
    timers.watch("x", 0.0)  # a wake-up that meets the stop
    await builder.stop_timers()
    assert task.done()
    assert builder.timers is None


def write_flaky(tmp_path: Path) -> Path:
    body = {
        "workflow_type": "Flaky",
        "workflow_version": "1.0.0",
        "initial_state_model": MODEL,
        "steps": [
            {
                "name": "Flaky",
                "function": f"{STEPS}.fail_once",
                "retry": {"max_attempts": 3, "initial_delay": 20},
            }
        ],
    }
    path = tmp_path / "flaky.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
    return path


@pytest.mark.parametrize("wall_jump", [0.0, 86_400.0])
async def test_a_retry_back_off_cut_by_a_restart_never_retries_early(
    tmp_path: Path, store: SQLiteStore, wall_jump: float
) -> None:
    from agent._engine import _Pending

    clock = FakeClock()
    path = write_flaky(tmp_path)
    builder = WorkflowBuilder([path], clock=clock)
    wf = await builder.create_workflow("Flaky", {}, store=store)
    driving = asyncio.ensure_future(wf.run())
    for _ in range(500):
        if wf.progress.timer is not None:
            break
        await asyncio.sleep(0.01)
    assert wf.progress.failures == {"f:Flaky": 1}
    wf.request_stop()  # the agent stops during the 20 s back-off
    assert await driving is S.ACTIVE
    clock.advance(5)
    clock.jump_wall(wall_jump)
    again = await WorkflowBuilder([path], clock=clock).load_workflow(wf.id, store)
    left = again._backoff_left(_Pending(), clock.wall())
    assert left is not None
    assert 14.9 < left <= 15.0  # what the back-off has left, by the boot-time clock


# -- recovery parks a page of waiting DELAYs in bulk -------------------------------------------------


async def _waiting_delays(
    tmp_path: Path, store: SQLiteStore, clock: FakeClock, count: int
) -> tuple[Path, list[str]]:
    """``count`` workflows waiting in a 3 s DELAY; the agent then dies and 1 s passes."""
    from test_delay import Agent
    from test_delay import write as write_delay

    definition = write_delay(tmp_path, {"duration": 3})
    first = await Agent(definition, clock).start(store)
    ids = []
    for _ in range(count):
        wf = await first.builder.create_workflow("Soak", {}, store=store)
        assert await wf.run() is S.ACTIVE
        ids.append(wf.id)
    await first.stop()
    clock.advance(1.0)
    return definition, ids


async def test_recovery_rebases_a_page_of_waiting_delays_in_one_write_without_a_workflow_each(
    tmp_path: Path, store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_delay import Agent, stored_timer

    clock = FakeClock()
    definition, ids = await _waiting_delays(tmp_path, store, clock, 20)
    second = await Agent(definition, clock).start(store)
    calls = {"commit": 0, "commit_many": 0, "write": 0, "rebuilt": 0}

    def counting(name: str, fn: Any) -> Any:
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return await fn(*args, **kwargs)

        return wrapper

    for name in ("commit", "commit_many", "write"):
        monkeypatch.setattr(store, name, counting(name, getattr(store, name)))
    from_record = second.builder._from_record

    def rebuilt(*args: Any) -> Workflow:
        calls["rebuilt"] += 1
        return from_record(*args)

    monkeypatch.setattr(second.builder, "_from_record", rebuilt)
    await _recovery.mark_interrupted_attempts(store)  # before READY: one write of its own
    calls["write"] = 0
    handed = [wf async for page in _recovery.pages(second.builder, store) for wf in page]
    assert handed == []  # all parked, none handed to the runner
    assert calls == {"commit": 0, "commit_many": 0, "write": 1, "rebuilt": 0}
    assert second.timers.count() == 20
    for wid in ids:
        wait = second.timers.waits(wid)
        assert wait is not None
        assert wait == pytest.approx(
            2.0, abs=0.1
        )  # what was left (2 s of 3), never the full 3 s again
        mark = await stored_timer(store, wid)
        assert mark is not None
        assert mark.since == clock.boottime()  # the rebase is committed
        assert second.builder.live(wid) is None
    await second.stop()


async def test_a_row_written_after_the_page_was_read_is_not_parked_from_its_stale_record(
    tmp_path: Path, store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_delay import Agent, recover

    clock = FakeClock()
    definition, ids = await _waiting_delays(tmp_path, store, clock, 3)
    second = await Agent(definition, clock).start(store)
    read_page = store.resumable_page

    async def page_then_cancel(*args: Any, **kwargs: Any) -> Any:
        page = await read_page(*args, **kwargs)
        if page:  # a command cancels the first one between the page's read and its rebase
            wf = await second.builder.load_workflow(ids[0], store)
            assert await wf.cancel() is S.CANCELLED
        return page

    monkeypatch.setattr(store, "resumable_page", page_then_cancel)
    assert await recover(second, store) == []
    rec = await store.load_instance(ids[0])
    assert rec is not None
    assert rec.status is S.CANCELLED  # not set back to waiting by the stale record
    assert "timer" not in rec.progress
    assert second.timers.waits(ids[0]) is None
    assert [second.timers.waits(w) is not None for w in ids[1:]] == [True, True]
    await second.stop()


async def test_timers_due_at_once_are_loaded_a_page_to_a_query_and_all_handed_over(
    tmp_path: Path, store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_delay import Agent
    from test_delay import write as write_delay

    from agent._timers import FIRE_PAGE

    clock = FakeClock()
    agent = await Agent(write_delay(tmp_path, {"duration": 600}), clock).start(store)
    count = FIRE_PAGE + 20
    ids = []
    for _ in range(count):
        wf = await agent.builder.create_workflow("Soak", {}, store=store)
        assert await wf.run() is S.ACTIVE
        ids.append(wf.id)
    agent.builder._live.clear()  # nothing held in memory: each must be read from the store
    reads = 0
    query = store.query

    async def counting(fn: Any) -> Any:
        nonlocal reads
        reads += 1
        return await query(fn)

    monkeypatch.setattr(store, "query", counting)
    timers = agent.timers
    for wid in ids:
        timers.watch(wid, 0.0)  # all due at the same instant (the task has not run since)
    for _ in range(500):
        if len(agent.submitted) == count:
            break
        await asyncio.sleep(0.01)
    assert sorted(wf.id for wf in agent.submitted) == sorted(ids)
    assert reads == 2  # two pages, one query each; not one read per timer
    await agent.stop()
