"""The async runner (agent._engine) against real SQLite files: the step contract, retry, timeout,
compensation failures, cancel, retry of a failed workflow, commits and events."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from _engine_fixtures import PAYMENT_DATA, PAYMENT_DIR, PAYMENT_STEPS, step, write_definition

from agent import (
    InvalidTransition,
    SQLiteStore,
    Workflow,
    WorkflowBuilder,
    WorkflowNotActive,
    WorkflowStatus,
)
from tests.flows.engine.steps import CALLS, EARLY, names

S = WorkflowStatus
EVENT_NAMES = {
    "workflow_started",
    "step_started",
    "step_completed",
    "step_failed",
    "compensation_started",
    "compensation_completed",
    "compensation_failed",
    "status_changed",
}
EVENT_KEYS = {
    "seq",
    "at",
    "workflow_id",
    "workflow_type",
    "event",
    "step",
    "attempt",
    "status",
    "error",
}
QUICK_RETRY = {"max_attempts": 3, "initial_delay": 0.01, "multiplier": 1.0, "max_delay": 0.01}


@pytest.fixture
def make(tmp_path: Path) -> Callable[..., WorkflowBuilder]:
    """``make(steps, saga_mode=...)`` writes a definition (type EngineTest) and loads it."""

    def build(steps: list[dict[str, Any]], **kw: Any) -> WorkflowBuilder:
        return WorkflowBuilder(definitions=[write_definition(tmp_path, steps, **kw)])

    return build


async def start(
    builder: WorkflowBuilder, store: SQLiteStore, data: dict[str, Any] | None = None, **kw: Any
) -> Workflow:
    return await builder.create_workflow("EngineTest", data or {}, store=store, **kw)


async def journal(store: SQLiteStore, wf: Workflow) -> list[tuple[str, str, int, str]]:
    return [(e.phase, e.step, e.attempt, e.outcome) for e in await store.journal(wf.id)]


async def events(store: SQLiteStore, wf: Workflow) -> list[dict[str, Any]]:
    items = await store.outbox_pending(limit=10_000)
    return [i.payload for i in items if i.workflow_id == wf.id and i.kind == "event"]


async def eventually(predicate: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


# ------------------------------------------------------------------------------------------------
# The step contract


async def test_async_steps_run_on_the_loop_and_sync_steps_off_it(make, store) -> None:
    builder = make([step("Async", "record_async"), step("Sync", "record")])
    wf = await start(builder, store)
    assert await wf.run() is S.COMPLETED
    loop_thread = threading.get_ident()
    by_name = {c.what: c.thread for c in CALLS[wf.id]}
    assert by_name["Async"] == loop_thread
    assert by_name["Sync"] != loop_thread
    assert wf.state.thread_id == by_name["Sync"]  # the returned dict was merged
    assert wf.state.log == ["Async", "Sync"]


async def test_sync_step_does_not_block_the_loop(make, store) -> None:
    builder = make([step("Slow", "sleepy_sync", params={"seconds": 0.3})])
    wf = await start(builder, store)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    task = asyncio.create_task(ticker())
    try:
        assert await wf.run() is S.COMPLETED
    finally:
        task.cancel()
    assert ticks >= 10
    assert wf.state.note == "late"


async def test_next_step_runs_one_step_without_automate_next(make, store) -> None:
    builder = make(
        [step("One", "record"), step("Two", "record", automate_next=True), step("Three", "record")]
    )
    wf = await start(builder, store)
    result = await wf.next_step()
    assert result is not None
    assert result["log"] == ["One"]
    assert wf.status == "ACTIVE"
    assert wf.current_step == "Two"
    await wf.next_step()  # Two continues into Three
    assert wf.status == "COMPLETED"
    assert names(wf.id) == ["One", "Two", "Three"]


@pytest.mark.parametrize(
    ("function", "phrases"),
    [
        ("wrong_field", ["no_such_field", "EngineState"]),
        ("wrong_type", ["count", "integer"]),
        ("not_a_dict", ["returned list"]),
    ],
)
async def test_bad_result_fails_the_step_with_a_clear_error(make, store, function, phrases) -> None:
    builder = make([step("Good", "record"), step("Bad", function), step("Never", "record")])
    wf = await start(builder, store)
    assert await wf.run() is S.FAILED
    assert wf.current_step == "Bad"
    for phrase in phrases:
        assert phrase in (wf.error or "")
    assert "'Bad'" in (wf.error or "")
    rows = await store.journal(wf.id)
    assert [(r.step, r.outcome) for r in rows] == [("Good", "completed"), ("Bad", "failed")]
    assert rows[-1].error == wf.error
    assert wf.state.log == ["Good"]
    assert wf.state.count == 0
    record = await store.load_instance(wf.id)
    assert record is not None
    assert record.error == wf.error
    assert record.status is S.FAILED
    assert "Never" not in names(wf.id)


async def test_in_place_mutation_is_kept_and_stored(make, store) -> None:
    builder = make([step("Mutate", "mutate_in_place")])
    wf = await start(builder, store, {"log": ["before"]})
    assert await wf.run() is S.COMPLETED
    assert wf.state.log == ["before", "mutated"]
    assert wf.state.count == 5
    record = await store.load_instance(wf.id)
    assert record is not None
    assert record.state["log"] == ["before", "mutated"]
    assert record.state["count"] == 5


async def test_in_place_mutation_of_a_failed_step_is_discarded(make, store) -> None:
    builder = make([step("Ok", "record"), step("Broken", "mutate_then_fail")])
    wf = await start(builder, store)
    assert await wf.run() is S.FAILED
    assert wf.state.log == ["Ok"]
    assert wf.state.count == 0
    record = await store.load_instance(wf.id)
    assert record is not None
    assert record.state["log"] == ["Ok"]
    assert record.state["count"] == 0


# ------------------------------------------------------------------------------------------------
# retry and timeout


async def test_retry_until_success(make, store) -> None:
    builder = make([step("Flaky", "flaky", retry=QUICK_RETRY, params={"succeed_on": 3})])
    wf = await start(builder, store)
    assert await wf.run() is S.COMPLETED
    calls = CALLS[wf.id]
    assert [c.attempt for c in calls] == [1, 2, 3]
    assert {c.key for c in calls} == {f"{wf.id}:Flaky"}  # stable across retries
    assert wf.state.count == 3
    assert await journal(store, wf) == [
        ("forward", "Flaky", 1, "failed"),
        ("forward", "Flaky", 2, "failed"),
        ("forward", "Flaky", 3, "completed"),
    ]


async def test_retry_exhausted_fails(make, store) -> None:
    retry = {**QUICK_RETRY, "max_attempts": 2}
    builder = make([step("Flaky", "flaky", retry=retry, params={"succeed_on": 5})])
    wf = await start(builder, store)
    assert await wf.run() is S.FAILED
    assert [c.attempt for c in CALLS[wf.id]] == [1, 2]
    assert "flaky attempt 2" in (wf.error or "")


async def test_retry_waits_its_backoff(make, store) -> None:
    retry = {"max_attempts": 2, "initial_delay": 0.2, "multiplier": 1.0}
    builder = make([step("Flaky", "flaky", retry=retry, params={"succeed_on": 2})])
    wf = await start(builder, store)
    t0 = time.monotonic()
    assert await wf.run() is S.COMPLETED
    assert time.monotonic() - t0 >= 0.18


async def test_async_step_timeout(make, store) -> None:
    builder = make([step("Slow", "sleepy_async", timeout=0.1, params={"seconds": 30})])
    wf = await start(builder, store)
    t0 = time.monotonic()
    assert await wf.run() is S.FAILED
    assert time.monotonic() - t0 < 5
    assert "timeout" in (wf.error or "")
    assert "'Slow'" in (wf.error or "")
    assert wf.state.note is None
    assert await journal(store, wf) == [("forward", "Slow", 1, "failed")]


async def test_sync_step_outliving_its_timeout_fails_and_its_late_result_is_discarded(
    make, store, caplog: pytest.LogCaptureFixture
) -> None:
    builder = make(
        [
            step("Slow", "sleepy_sync", timeout=0.05, params={"seconds": 0.4}),
            step("After", "record"),
        ],
        saga_mode=False,
    )
    wf = await start(builder, store)
    with caplog.at_level(logging.WARNING, logger="edgesaga.workflow"):
        assert await wf.run() is S.FAILED
        assert "timeout" in (wf.error or "")
        await eventually(lambda: "late-done:Slow" in names(wf.id))
        await eventually(lambda: "late result is discarded" in caplog.text)
    assert wf.state.note is None  # neither the late return value nor its in-place change
    record = await store.load_instance(wf.id)
    assert record is not None
    assert record.state["note"] is None
    assert record.status is S.FAILED
    assert "After" not in names(wf.id)


# ------------------------------------------------------------------------------------------------
# Compensation


async def test_compensation_failure_is_retried_recorded_and_alerted(make, store) -> None:
    comp_retry = {"max_attempts": 2, "initial_delay": 0.01}
    builder = make(
        [
            step("A", "record", "undo"),
            step("B", "record", "broken_undo", compensate_retry=comp_retry),
            step("C", "record", "undo"),
            step("D", "fail", "undo"),
        ],
        saga_mode=True,
    )
    wf = await start(builder, store)
    assert await wf.run() is S.COMPENSATION_FAILED
    assert names(wf.id) == ["A", "B", "C", "D", "undo:C", "undo:B", "undo:B", "undo:A"]
    assert wf.state.log == ["A", "B", "C", "undo:C", "undo:A"]
    assert wf.progress.compensation_failed == ("B",)
    assert wf.progress.compensated == ("C", "A")
    assert await journal(store, wf) == [
        ("forward", "A", 1, "completed"),
        ("forward", "B", 1, "completed"),
        ("forward", "C", 1, "completed"),
        ("forward", "D", 1, "failed"),
        ("compensate", "C", 1, "completed"),
        ("compensate", "B", 1, "failed"),
        ("compensate", "B", 2, "failed"),
        ("compensate", "A", 1, "completed"),
    ]
    alerts = [i for i in await store.outbox_pending(limit=1000) if i.kind == "alert"]
    assert len(alerts) == 1
    alert = alerts[0].payload
    assert alert["workflow_id"] == wf.id
    assert alert["step"] == "B"
    assert "cannot undo B" in alert["error"]
    assert alerts[0].workflow_id == wf.id
    evs = await events(store, wf)
    assert [e["step"] for e in evs if e["event"] == "compensation_failed"] == ["B", "B"]
    assert evs[-1]["event"] == "status_changed"
    assert evs[-1]["status"] == "COMPENSATION_FAILED"


async def test_idempotency_keys(make, store) -> None:
    builder = make([step("P1", "key_probe", "undo"), step("P2", "fail")], saga_mode=True)
    wf = await start(builder, store, workflow_id="wf-keys")
    assert await wf.run() is S.FAILED_ROLLED_BACK
    keys = {c.what: c.key for c in CALLS["wf-keys"]}
    assert keys == {
        "P1": "wf-keys:P1",
        "P2": "wf-keys:P2",
        "undo:P1": "wf-keys:P1:compensate",
    }
    assert wf.state.keys == ["wf-keys:P1"]


async def test_compensation_results_are_merged(make, store) -> None:
    builder = make([step("A", "record", "undo_async"), step("B", "fail")], saga_mode=True)
    wf = await start(builder, store)
    assert await wf.run() is S.FAILED_ROLLED_BACK
    assert wf.state.log == ["A", "undo:A"]


# ------------------------------------------------------------------------------------------------
# Creating, loading and driving


async def test_create_with_existing_workflow_id_returns_the_existing_one(make, store) -> None:
    builder = make([step("One", "record")])
    first = await start(builder, store, {"count": 1}, workflow_id="same-id")
    again = await start(builder, store, {"count": 2}, workflow_id="same-id")
    assert again is first
    other_builder = make([step("One", "record")])
    third = await start(other_builder, store, {"count": 3}, workflow_id="same-id")
    assert third.id == "same-id"
    assert third.state.count == 1
    assert [r.id for r in await store.list_instances(limit=100)] == ["same-id"]
    assert len([e for e in await events(store, first) if e["event"] == "workflow_started"]) == 1


async def test_instance_is_committed_before_step_one(make, store) -> None:
    builder = make([step("One", "record")])
    wf = await start(builder, store)
    record = await store.load_instance(wf.id)
    assert record is not None
    assert record.status is S.ACTIVE
    assert record.current_step == "One"
    assert names(wf.id) == []


async def test_next_step_on_a_finished_workflow_raises(make, store) -> None:
    builder = make([step("One", "record")])
    wf = await start(builder, store)
    await wf.next_step()
    assert wf.status is S.COMPLETED
    with pytest.raises(WorkflowNotActive) as info:
        await wf.next_step()
    assert info.value.workflow_id == wf.id
    assert info.value.status == "COMPLETED"
    with pytest.raises(InvalidTransition):
        await wf.cancel()
    with pytest.raises(InvalidTransition):
        await wf.retry()


async def test_cancel_idle_saga_workflow_compensates_completed_steps(make, store) -> None:
    builder = make(
        [step("A", "record", "undo"), step("B", "record", "undo"), step("C", "record", "undo")],
        saga_mode=True,
    )
    wf = await start(builder, store)
    await wf.next_step()
    await wf.next_step()
    assert wf.status is S.ACTIVE
    assert not wf.is_running
    assert await wf.cancel("no longer needed") is S.CANCELLED
    assert names(wf.id) == ["A", "B", "undo:B", "undo:A"]
    assert wf.state.log == ["A", "B", "undo:B", "undo:A"]
    assert wf.error == "no longer needed"
    record = await store.load_instance(wf.id)
    assert record is not None
    assert record.status is S.CANCELLED


async def test_cancel_idle_workflow_without_saga(make, store) -> None:
    builder = make([step("A", "record", "undo"), step("B", "record", "undo")])
    wf = await start(builder, store)
    await wf.next_step()
    assert await wf.cancel() is S.CANCELLED
    assert names(wf.id) == ["A"]


async def test_cancel_running_async_step(make, store) -> None:
    builder = make(
        [
            step("A", "record", "undo"),
            step("B", "record_async", "undo"),
            step("Wait", "wait_forever", "undo_async"),
            step("Z", "record", "undo"),
        ],
        saga_mode=True,
    )
    wf = await start(builder, store)
    runner = asyncio.create_task(wf.run())
    await eventually(lambda: "Wait" in names(wf.id))
    assert wf.is_running
    await wf.cancel("operator said stop")
    status = await asyncio.wait_for(runner, 5)
    assert names(wf.id) == ["A", "B", "Wait", "cancelled:Wait", "undo:Wait", "undo:B", "undo:A"]
    assert await journal(store, wf) == [
        ("forward", "A", 1, "completed"),
        ("forward", "B", 1, "completed"),
        ("forward", "Wait", 1, "cancelled"),
        ("compensate", "Wait", 1, "completed"),
        ("compensate", "B", 1, "completed"),
        ("compensate", "A", 1, "completed"),
    ]
    assert status is S.CANCELLED
    record = await store.load_instance(wf.id)
    assert record is not None
    assert record.status is S.CANCELLED


async def test_async_step_that_waits_several_times_returns_its_result(make, store) -> None:
    """An async step runs at once and, when it waits, goes on in a task of its own; its result is
    merged the same either way."""
    builder = make([step("Now", "record_async"), step("Later", "several_waits")])
    wf = await start(builder, store)
    assert await wf.run() is S.COMPLETED
    assert wf.state.note == "after three waits"
    assert names(wf.id) == ["Now", "Later"]


async def test_cancel_reaches_a_step_that_awaits_its_clean_up(make, store) -> None:
    builder = make(
        [step("A", "record", "undo"), step("Wait", "cleans_up_when_cancelled", "undo")],
        saga_mode=True,
    )
    wf = await start(builder, store)
    runner = asyncio.create_task(wf.run())
    await eventually(lambda: "Wait" in names(wf.id))
    await wf.cancel()
    assert await asyncio.wait_for(runner, 5) is S.CANCELLED
    assert names(wf.id) == ["A", "Wait", "cleaned:Wait", "undo:Wait", "undo:A"]
    assert await journal(store, wf) == [
        ("forward", "A", 1, "completed"),
        ("forward", "Wait", 1, "cancelled"),
        ("compensate", "Wait", 1, "completed"),
        ("compensate", "A", 1, "completed"),
    ]


async def test_cancel_before_an_async_steps_task_first_runs_still_reaches_the_step(
    make, store
) -> None:
    """The step's first part runs inline; a cancel that lands before its task has taken a step
    must still be delivered inside the step, not swallowed with the unstarted task."""
    builder = make(
        [step("A", "record", "undo"), step("Wait", "cancelled_before_it_waits", "undo")],
        saga_mode=True,
    )
    wf = await start(builder, store)
    EARLY[wf.id] = lambda: wf.request_cancel("early")
    try:
        assert await asyncio.wait_for(wf.run(), 5) is S.CANCELLED
    finally:
        EARLY.pop(wf.id, None)
    assert names(wf.id) == ["A", "Wait", "cancelled:Wait", "undo:Wait", "undo:A"]


async def test_driver_cancelled_before_an_async_steps_task_first_runs_still_reaches_the_step(
    make, store
) -> None:
    """A shutdown cancels the task that drives the workflow. Landing before the step's own task
    has taken a step (later in the loop iteration that started the step), that cancel must still
    be delivered inside the step (its clean-up runs); the attempt is left cut short, for
    recovery, as at any shutdown."""
    builder = make(
        [step("A", "record", "undo"), step("Wait", "cancelled_before_it_waits", "undo")],
        saga_mode=True,
    )
    wf = await start(builder, store)
    driver = asyncio.create_task(wf.run())
    EARLY[wf.id] = driver.cancel
    try:
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(driver, 5)
    finally:
        EARLY.pop(wf.id, None)
    assert names(wf.id) == ["A", "Wait", "cancelled:Wait"]
    again = await builder.load_workflow(wf.id, store)
    assert again.status is S.ACTIVE
    assert again.current_step == "Wait"


async def test_cancel_during_a_retry_delay_does_not_wait_it_out(make, store) -> None:
    retry = {"max_attempts": 3, "initial_delay": 30, "multiplier": 1.0}
    builder = make(
        [step("A", "record", "undo"), step("Flaky", "flaky", retry=retry)], saga_mode=True
    )
    wf = await start(builder, store)
    runner = asyncio.create_task(wf.run())
    await eventually(lambda: "Flaky" in names(wf.id))
    await asyncio.sleep(0.05)  # now in the 30 s backoff
    t0 = time.monotonic()
    await wf.cancel()
    assert await asyncio.wait_for(runner, 5) is S.CANCELLED
    assert time.monotonic() - t0 < 5
    assert names(wf.id) == ["A", "Flaky", "undo:A"]


async def test_cancel_while_a_sync_step_runs_compensates_it_after_it_completes(make, store) -> None:
    builder = make(
        [
            step("A", "record", "undo"),
            step("Slow", "sleepy_sync", "undo", params={"seconds": 0.3}),
            step("Z", "record", "undo"),
        ],
        saga_mode=True,
    )
    wf = await start(builder, store)
    runner = asyncio.create_task(wf.run())
    await eventually(lambda: "Slow" in names(wf.id))
    await wf.cancel()
    assert await asyncio.wait_for(runner, 5) is S.CANCELLED
    # A thread cannot be stopped: the step finished, so it is compensated too.
    assert names(wf.id) == ["A", "Slow", "late-done:Slow", "undo:Slow", "undo:A"]


async def test_compensation_in_a_cancel_rollback_is_retried(make, store) -> None:
    comp_retry = {"max_attempts": 3, "initial_delay": 0.01}
    builder = make(
        [step("A", "record", "flaky_undo", compensate_retry=comp_retry), step("B", "record")],
        saga_mode=True,
    )
    wf = await start(builder, store)
    await wf.next_step()
    assert await wf.cancel() is S.CANCELLED
    assert [(c.what, c.attempt) for c in CALLS[wf.id]] == [("A", 1), ("undo:A", 1), ("undo:A", 2)]
    assert wf.progress.compensation_failed == ()


async def test_retry_compensation_failed_after_fixing_the_cause(make, store, tmp_path) -> None:
    flag = tmp_path / "refund-api-down.flag"
    flag.write_text("x")
    steps = [
        step("A", "record", "undo"),
        step("B", "record", "undo_fail_if_flag", compensate_retry={"max_attempts": 1}),
        step("C", "fail"),
    ]
    builder = make(steps, saga_mode=True)
    wf = await start(builder, store, {"flag_file": str(flag)})
    assert await wf.run() is S.COMPENSATION_FAILED
    assert names(wf.id) == ["A", "B", "C", "undo:B", "undo:A"]
    flag.unlink()
    retried = await make(steps, saga_mode=True).retry(wf.id, store)
    assert retried.status is S.FAILED_ROLLED_BACK
    assert names(wf.id) == ["A", "B", "C", "undo:B", "undo:A", "undo:B"]
    assert retried.state.log == ["A", "B", "undo:A", "undo:B"]


async def test_retry_failed_workflow_after_fixing_the_cause(make, store, tmp_path: Path) -> None:
    flag = tmp_path / "broken.flag"
    flag.write_text("x")
    steps = [
        step("A", "record"),
        step("B", "record"),
        step("C", "fail_if_flag"),
        step("D", "record"),
    ]
    builder = make(steps)
    wf = await start(builder, store, {"flag_file": str(flag)})
    assert await wf.run() is S.FAILED
    assert names(wf.id) == ["A", "B", "C"]

    flag.unlink()  # the cause is fixed
    fresh = make(steps)  # as from the CLI: another builder, state from the store
    retried = await fresh.retry(wf.id, store)
    assert retried.status is S.COMPLETED
    assert names(wf.id) == ["A", "B", "C", "C", "D"]
    assert retried.state.log == ["A", "B", "C", "D"]
    assert await journal(store, wf) == [
        ("forward", "A", 1, "completed"),
        ("forward", "B", 1, "completed"),
        ("forward", "C", 1, "failed"),
        ("forward", "C", 2, "completed"),
        ("forward", "D", 1, "completed"),
    ]


async def test_started_record_and_previous_result_are_committed_before_a_step_runs(
    make, store, tmp_path
) -> None:
    builder = make([step("One", "record"), step("Two", "look_at_journal")])
    wf = await start(builder, store, {"db": str(tmp_path / "edgesaga.db")})
    assert await wf.run() is S.COMPLETED
    assert wf.state.seen == [["One/forward/1/completed", "Two/forward/1/started", "log=One"]]


async def test_one_commit_per_step(make, store) -> None:
    steps = [step(f"S{i}", "record_async") for i in range(4)]
    builder = make(steps)
    before = store.commits
    wf = await start(builder, store)
    assert await wf.run() is S.COMPLETED
    assert store.commits - before <= len(steps) + 2
    assert [o for *_, o in await journal(store, wf)] == ["completed"] * 4


# ------------------------------------------------------------------------------------------------
# Events


def check_event_shape(evs: list[dict[str, Any]], wf: Workflow) -> None:
    for e in evs:
        assert set(e) == EVENT_KEYS
        assert e["event"] in EVENT_NAMES
        assert e["workflow_id"] == wf.id
        assert e["workflow_type"] == wf.workflow_type
        assert e["at"].endswith("Z")
        datetime.fromisoformat(e["at"].replace("Z", "+00:00"))
        assert e["status"] in {s.value for s in S}
    seqs = [e["seq"] for e in evs]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs)


@pytest.fixture
def payment() -> WorkflowBuilder:
    return WorkflowBuilder(definitions=[PAYMENT_DIR])


async def test_events_success(payment, store, capsys) -> None:
    wf = await payment.create_workflow(
        "PaymentProcessing", PAYMENT_DATA, store=store, saga_mode=True
    )
    assert await wf.run() is S.COMPLETED
    capsys.readouterr()
    evs = await events(store, wf)
    check_event_shape(evs, wf)
    expected = [("workflow_started", "Create_Order", None)]
    for name in PAYMENT_STEPS:
        expected += [("step_started", name, 1), ("step_completed", name, 1)]
    expected.append(("status_changed", None, None))
    assert [(e["event"], e["step"], e["attempt"]) for e in evs] == expected
    assert evs[-1]["status"] == "COMPLETED"
    assert evs[-2]["status"] == "COMPLETED"  # the last step_completed carries the new status
    assert all(e["status"] == "ACTIVE" for e in evs[:-2])


async def test_events_rollback(payment, store, capsys) -> None:
    data = {**PAYMENT_DATA, "fail_step": "Reserve_Inventory"}
    wf = await payment.create_workflow("PaymentProcessing", data, store=store, saga_mode=True)
    assert await wf.run() is S.FAILED_ROLLED_BACK
    capsys.readouterr()
    evs = await events(store, wf)
    check_event_shape(evs, wf)
    assert [(e["event"], e["step"], e["status"]) for e in evs] == [
        ("workflow_started", "Create_Order", "ACTIVE"),
        ("step_started", "Create_Order", "ACTIVE"),
        ("step_completed", "Create_Order", "ACTIVE"),
        ("step_started", "Charge_Payment", "ACTIVE"),
        ("step_completed", "Charge_Payment", "ACTIVE"),
        ("step_started", "Reserve_Inventory", "ACTIVE"),
        ("step_failed", "Reserve_Inventory", "COMPENSATING"),
        ("status_changed", "Charge_Payment", "COMPENSATING"),
        ("compensation_started", "Charge_Payment", "COMPENSATING"),
        ("compensation_completed", "Charge_Payment", "COMPENSATING"),
        ("compensation_started", "Create_Order", "COMPENSATING"),
        ("compensation_completed", "Create_Order", "FAILED_ROLLED_BACK"),
        ("status_changed", "Reserve_Inventory", "FAILED_ROLLED_BACK"),
    ]
    failed = next(e for e in evs if e["event"] == "step_failed")
    assert "Inventory service unavailable" in failed["error"]


async def test_recovery_runs_an_old_version_from_its_snapshot_and_skips_one_it_cannot_rebuild(
    tmp_path,
) -> None:
    """After the YAML changed, recovery resumes instances from the definition stored with them; an
    instance whose step module is gone is left alone (with an alert), the others still resume."""
    import textwrap

    from agent import SQLiteStore, WorkflowBuilder

    mod = tmp_path / "gone_steps.py"
    mod.write_text("def step(state, context, **params):\n    return None\n")
    defs = tmp_path / "defs"
    defs.mkdir()
    yaml_v1 = textwrap.dedent(
        """
        workflow_type: Versioned
        workflow_version: "1.0.0"
        initial_state_model: workflows.payment.models.PaymentState
        steps:
          - {name: A, function: workflows.payment.steps.create_order}
          - {name: B, function: workflows.payment.steps.charge_payment}
        """
    )
    (defs / "v.yaml").write_text(yaml_v1)
    (defs / "gone.yaml").write_text(
        "workflow_type: Gone\nworkflow_version: '1'\n"
        "initial_state_model: workflows.payment.models.PaymentState\n"
        "steps:\n  - {name: A, function: gone_steps.step}\n"
    )
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        data = {"order_id": "O", "customer_id": "C", "amount": 1.0}
        async with SQLiteStore(tmp_path / "db") as store:
            b1 = WorkflowBuilder(definitions=[defs])
            old = await b1.create_workflow("Versioned", data, store=store)
            gone = await b1.create_workflow("Gone", data, store=store)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("gone_steps", None)
    mod.unlink()
    (defs / "gone.yaml").unlink()
    (defs / "v.yaml").write_text(
        yaml_v1.replace('"1.0.0"', '"2.0.0"').replace("- {name: B,", "- {name: C,")
    )
    async with SQLiteStore(tmp_path / "db") as store:
        b2 = WorkflowBuilder(definitions=[defs])
        recovered = await b2.recover(store)
        assert [w.id for w in recovered] == [old.id]
        assert recovered[0].status == "COMPLETED"
        # v1's steps (A's first attempt, begun with the instance, counts as cut short by the stop)
        journal = await store.journal(old.id)
        assert [j.step for j in journal if j.outcome == "completed"] == ["A", "B"]
        rec = await store.load_instance(gone.id)
        assert rec is not None
        assert rec.status == "ACTIVE"
        alerts = [i.payload for i in await store.outbox_pending(1000) if i.kind == "alert"]
        assert [a["alert"] for a in alerts] == ["recovery_failed"]
        assert alerts[0]["workflow_id"] == gone.id
        assert "gone_steps" in alerts[0]["message"]
