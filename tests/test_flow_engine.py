"""The engine runs DECISION, HUMAN_INPUT, PARALLEL and pivot steps on a real SQLite file
(DESIGN §10): the path taken is what is compensated, a pause survives a new builder, branches
run concurrently, and nothing after the pivot is rolled back."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml
from _engine_fixtures import ROOT  # noqa: F401  (puts the repository on sys.path)

from agent import (
    InvalidInput,
    InvalidTransition,
    SQLiteStore,
    WorkflowBuilder,
    WorkflowNotFound,
    WorkflowStatus,
)
from agent import _saga as saga
from agent._engine import _Pending
from agent._records import JournalEnd, JournalStart
from tests.flows.core import steps as core_steps

S = WorkflowStatus
STEPS = "tests.flows.core.steps"
MODEL = "tests.flows.core.models.FlowState"


def st(name: str, function: str = "do", undo: bool = True, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "function": f"{STEPS}.{function}"}
    if undo:
        out["compensate_function"] = f"{STEPS}.undo"
    out.update(extra)
    return out


def write(tmp_path: Path, steps: list[dict[str, Any]], *, saga_mode: bool = True) -> Path:
    path = tmp_path / "flow.yaml"
    body = {
        "workflow_type": "Flow",
        "workflow_version": "1.0.0",
        "initial_state_model": MODEL,
        "saga_mode": saga_mode,
        "steps": steps,
    }
    path.write_text(yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def fresh_events() -> None:
    core_steps.EVENTS.clear()


async def outbox(store: SQLiteStore, wid: str, kind: str = "event") -> list[dict[str, Any]]:
    items = await store.outbox_pending(10_000)
    return [i.payload for i in items if i.workflow_id == wid and i.kind == kind]


# ------------------------------------------------------------------------------------------------
# DECISION


def decision_flow(tmp_path: Path, *, fail_at_end: bool = True, default: str | None = None) -> Path:
    pick: dict[str, Any] = {
        "name": "Pick",
        "type": "DECISION",
        "function": f"{STEPS}.choose",
        "routes": {"a": "A1", "b": "B1", "none": "END"},
    }
    if default is not None:
        pick["default"] = default
    return write(
        tmp_path,
        [
            st("Start"),
            pick,
            st("A1", next="Finish"),
            st("B1"),
            st("B2"),
            st("Finish", "fail" if fail_at_end else "do"),
        ],
    )


async def test_decision_route_b_compensates_only_route_b(
    tmp_path: Path, store: SQLiteStore
) -> None:
    builder = WorkflowBuilder([decision_flow(tmp_path)])
    wf = await builder.start_workflow("Flow", {"route": "b"}, store=store)
    assert wf.status is S.FAILED_ROLLED_BACK
    assert wf.state.ledger == ["Start", "B1", "B2", "undo:B2", "undo:B1", "undo:Start"]
    assert wf.progress.routes == {"Pick": "b"}
    # The route is journaled: a new builder reads it from the store.
    again = await WorkflowBuilder([decision_flow(tmp_path)]).load_workflow(wf.id, store)
    assert again.progress.routes == {"Pick": "b"}
    assert again.progress.completed == ("Start", "Pick", "B1", "B2")


async def test_decision_route_to_end_completes(tmp_path: Path, store: SQLiteStore) -> None:
    builder = WorkflowBuilder([decision_flow(tmp_path)])
    wf = await builder.start_workflow("Flow", {"route": "none"}, store=store)
    assert wf.status is S.COMPLETED
    assert wf.state.ledger == ["Start"]


async def test_decision_unknown_key_without_default_fails_the_step(
    tmp_path: Path, store: SQLiteStore
) -> None:
    builder = WorkflowBuilder([decision_flow(tmp_path)])
    wf = await builder.start_workflow("Flow", {"route": "zzz"}, store=store)
    assert wf.status is S.FAILED_ROLLED_BACK
    assert wf.progress.failed_step == "Pick"
    assert "'zzz', which is none of its routes" in (wf.error or "")
    assert wf.state.ledger == ["Start", "undo:Start"]


async def test_decision_none_takes_the_default(tmp_path: Path, store: SQLiteStore) -> None:
    builder = WorkflowBuilder([decision_flow(tmp_path, fail_at_end=False, default="A1")])
    wf = await builder.start_workflow("Flow", {}, store=store)
    assert wf.status is S.COMPLETED
    assert wf.state.ledger == ["Start", "A1", "Finish"]
    assert wf.progress.routes == {"Pick": ""}


async def test_decision_reloaded_by_a_new_builder_goes_on(
    tmp_path: Path, store: SQLiteStore
) -> None:
    path = decision_flow(tmp_path, fail_at_end=False)
    wf = await WorkflowBuilder([path]).create_workflow("Flow", {"route": "a"}, store=store)
    await wf.next_step()  # Start
    await wf.next_step()  # Pick
    assert wf.current_step == "A1"
    other = await WorkflowBuilder([path]).load_workflow(wf.id, store)
    assert other.current_step == "A1"
    assert await other.run() is S.COMPLETED
    assert other.state.ledger == ["Start", "A1", "Finish"]


# ------------------------------------------------------------------------------------------------
# HUMAN_INPUT


def approval_flow(tmp_path: Path, **ask: Any) -> Path:
    step: dict[str, Any] = {
        "name": "Ask",
        "type": "HUMAN_INPUT",
        "input_model": "tests.flows.core.models.Approval",
        **ask,
    }
    return write(tmp_path, [st("Before"), step, st("After", undo=False)])


async def test_pause_then_invalid_then_valid_input(tmp_path: Path, store: SQLiteStore) -> None:
    builder = WorkflowBuilder([approval_flow(tmp_path, approve_with="approve_button")])
    wf = await builder.start_workflow("Flow", {}, store=store)
    assert wf.status is S.PAUSED
    assert wf.current_step == "Ask"
    waiting = wf.waiting_input
    assert waiting is not None
    assert waiting["step"] == "Ask"
    assert waiting["approve_with"] == "approve_button"
    assert set(waiting["schema"]["properties"]) == {"approved", "note"}
    assert wf.snapshot()["status"] == "PAUSED"
    assert builder.paused_waiting_on("approve_button") == [wf.id]
    rec = await store.load_instance(wf.id)
    assert rec is not None
    assert rec.status is S.PAUSED
    assert rec.current_step == "Ask"

    with pytest.raises(InvalidInput) as info:
        await builder.resume(store, wf.id, {"approved": "perhaps"})
    assert str(info.value).startswith("Field 'approved': Input should be a valid boolean")
    assert str(info.value).endswith("The workflow stays PAUSED.")
    assert info.value.code == "invalid_input"
    rec = await store.load_instance(wf.id)
    assert rec is not None
    assert rec.status is S.PAUSED

    resumed = await builder.resume(store, wf.id, {"approved": False, "note": "checked"})
    assert resumed.status is S.ACTIVE
    rec = await store.load_instance(wf.id)
    assert rec is not None
    assert rec.status is S.ACTIVE
    assert rec.state["note"] == "checked"
    assert rec.state["approved"] is False
    assert await resumed.run() is S.COMPLETED
    assert resumed.state.ledger == ["Before", "After"]
    assert builder.paused_waiting_on("approve_button") == []
    paused = [e for e in await outbox(store, wf.id) if e["event"] == "workflow_paused"]
    assert [e["step"] for e in paused] == ["Ask"]


async def test_resume_refuses_unknown_field_and_non_paused(
    tmp_path: Path, store: SQLiteStore
) -> None:
    builder = WorkflowBuilder([approval_flow(tmp_path)])
    wf = await builder.start_workflow("Flow", {}, store=store)
    with pytest.raises(InvalidInput, match="Field 'colour' is not a field of Approval"):
        await builder.resume(store, wf.id, {"colour": "red"})
    await builder.resume(store, wf.id, None)  # the model's defaults
    assert wf.state.approved is True
    with pytest.raises(InvalidTransition, match="only a PAUSED workflow"):
        await builder.resume(store, wf.id, {})
    with pytest.raises(WorkflowNotFound):
        await builder.resume(store, "no-such-id", {})


async def test_paused_workflow_reloaded_by_a_new_builder_resumes(
    tmp_path: Path, store: SQLiteStore
) -> None:
    path = approval_flow(tmp_path, approve_with="approve_button", timeout=3600)
    wf = await WorkflowBuilder([path]).start_workflow("Flow", {}, store=store)
    assert wf.status is S.PAUSED
    fresh = WorkflowBuilder([path])
    assert await fresh.recover(store) == []  # recovery leaves a PAUSED workflow waiting
    rearmed = await fresh.rearm_pauses(store)
    assert [w.id for w in rearmed] == [wf.id]
    assert fresh.paused_waiting_on("approve_button") == [wf.id]
    assert wf.id in fresh._pause_timers
    again = await fresh.resume(store, wf.id, {"approved": True})
    assert wf.id not in fresh._pause_timers
    assert await again.run() is S.COMPLETED
    assert again.state.ledger == ["Before", "After"]


async def test_every_paused_workflow_is_rearmed_page_after_page(
    tmp_path: Path, store: SQLiteStore
) -> None:
    path = approval_flow(tmp_path, approve_with="approve_button", timeout=3600)
    first = WorkflowBuilder([path])
    ids = [(await first.start_workflow("Flow", {}, store=store)).id for _ in range(5)]
    fresh = WorkflowBuilder([path])
    fresh.paused_page = 2  # three pages: 2, 2 and 1
    rearmed = await fresh.rearm_pauses(store)
    assert sorted(w.id for w in rearmed) == sorted(ids)
    assert fresh.paused_waiting_on("approve_button") == ids  # oldest pause first
    assert all(wid in fresh._pause_timers for wid in ids)


async def test_pause_timeout_fail_rolls_back(tmp_path: Path, store: SQLiteStore) -> None:
    builder = WorkflowBuilder([approval_flow(tmp_path, timeout=0.05, on_timeout="fail")])
    wf = await builder.start_workflow("Flow", {}, store=store)
    assert wf.status is S.PAUSED
    assert await asyncio.wait_for(wf.wait(), 10) is S.FAILED_ROLLED_BACK
    assert wf.state.ledger == ["Before", "undo:Before"]
    assert "within its timeout of 0.05 s" in (wf.error or "")


async def test_pause_timeout_continue_takes_the_defaults(
    tmp_path: Path, store: SQLiteStore
) -> None:
    builder = WorkflowBuilder([approval_flow(tmp_path, timeout=0.05, on_timeout="continue")])
    seen: list[str] = []
    due = asyncio.Event()

    def on_timeout(workflow_id: str) -> None:
        seen.append(workflow_id)
        due.set()

    builder.on_pause_timeout = on_timeout
    wf = await builder.start_workflow("Flow", {}, store=store)
    await asyncio.wait_for(due.wait(), 10)
    assert seen == [wf.id]
    assert wf.status is S.PAUSED  # the callback decides; the builder did not act on its own
    driven = await builder.expire_pause(store, wf.id)
    assert driven is wf
    assert await wf.run() is S.COMPLETED
    assert wf.state.approved is True
    assert await builder.expire_pause(store, wf.id) is None


async def test_cancel_of_a_paused_workflow_compensates(tmp_path: Path, store: SQLiteStore) -> None:
    builder = WorkflowBuilder([approval_flow(tmp_path)])
    wf = await builder.start_workflow("Flow", {}, store=store)
    assert await builder.cancel(wf.id, store) is wf
    assert wf.status is S.CANCELLED
    assert wf.state.ledger == ["Before", "undo:Before"]


# ------------------------------------------------------------------------------------------------
# PARALLEL


def parallel_flow(tmp_path: Path, left: list[dict[str, Any]], right: list[dict[str, Any]]) -> Path:
    both = {"name": "Both", "type": "PARALLEL", "branches": [left, right]}
    return write(tmp_path, [st("Before"), both, st("After", undo=False)])


async def test_branches_run_concurrently(tmp_path: Path, store: SQLiteStore) -> None:
    path = parallel_flow(
        tmp_path,
        [st("L1", "await_event", params={"name": "go"}), st("L2")],
        [st("R1", "set_event", params={"name": "go"})],
    )
    wf = await WorkflowBuilder([path]).start_workflow("Flow", {}, store=store)
    assert wf.status is S.COMPLETED
    assert wf.state.a == 1
    assert wf.state.b == 2
    done = wf.progress.completed
    # L1 could only finish after R1 set the event: the branches ran side by side.
    assert done.index("R1") < done.index("L1") < done.index("L2")
    assert done[-2:] == ("Both", "After")


async def test_failing_branch_compensates_both_branches_then_before(
    tmp_path: Path, store: SQLiteStore
) -> None:
    path = parallel_flow(
        tmp_path,
        [st("L1"), st("L2", "set_event", params={"name": "l2"}), st("L3", "wait_long")],
        [st("R1"), st("R2", "fail_after_event", params={"name": "l2"})],
    )
    wf = await WorkflowBuilder([path]).start_workflow("Flow", {}, store=store)
    assert wf.status is S.FAILED_ROLLED_BACK
    done = wf.progress.completed
    assert set(done) == {"Before", "L1", "L2", "R1"}
    undone = [x for x in wf.state.ledger if x.startswith("undo:")]
    # L3 was stopped mid-flight (it may have taken effect): its own compensation first, then
    # every completed step of both branches newest first, then the step before.
    assert undone == ["undo:L3", *(f"undo:{s}" for s in reversed(done))]
    assert undone[-1] == "undo:Before"
    journal = await store.journal(wf.id)
    assert [(e.phase, e.outcome) for e in journal if e.step == "L3"] == [
        ("forward", "cancelled"),
        ("compensate", "completed"),
    ]


async def test_parallel_reloaded_mid_branch_resumes_each_branch(
    tmp_path: Path, store: SQLiteStore
) -> None:
    path = parallel_flow(tmp_path, [st("L1"), st("L2")], [st("R1"), st("R2")])
    wf = await WorkflowBuilder([path]).create_workflow("Flow", {}, store=store)
    await wf.next_step()  # Before
    # As if the agent died with L1 done and L2 and R1 in flight: their "started" is committed.
    plan = wf._plan
    pending = _Pending()
    p = wf.progress
    for step in ("L1", "R1"):
        p = saga.branch_begin(plan, p, step).progress
        pending.journal.append(JournalStart(p.journal_seq, step, "forward", 1, 1.0))
    l1_seq = next(fl.seq for fl in p.running if fl.step == "L1")
    p = saga.branch_succeeded(plan, p, "L1").progress
    pending.journal.append(JournalEnd(l1_seq, "completed", 1.0))
    p = saga.branch_begin(plan, p, "L2").progress
    pending.journal.append(JournalStart(p.journal_seq, "L2", "forward", 1, 1.0))
    wf._progress = p
    await wf._commit(pending, 1.0)

    other = await WorkflowBuilder([path]).load_workflow(wf.id, store)
    assert {fl.step for fl in other.progress.running} == {"L2", "R1"}
    assert await other.run() is S.COMPLETED
    done = other.progress.completed
    assert done[:2] == ("Before", "L1")
    assert set(done[2:5]) == {"L2", "R1", "R2"}  # each branch went on from its own position
    assert done.index("R1") < done.index("R2")
    assert done[5:] == ("Both", "After")
    journal = await store.journal(wf.id)
    assert sorted(e.step for e in journal if e.outcome == "interrupted") == ["L2", "R1"]


# ------------------------------------------------------------------------------------------------
# pivot


def pivot_flow(tmp_path: Path) -> Path:
    return write(
        tmp_path,
        [
            st("Reserve"),
            st("Charge", pivot=True),
            st("Ship", "fail_once", undo=False, retry={"max_attempts": 2, "initial_delay": 0}),
            st("Notify", undo=False, retry={"max_attempts": 2}),
        ],
    )


async def test_failure_after_the_pivot_fails_without_rollback(
    tmp_path: Path, store: SQLiteStore
) -> None:
    path = pivot_flow(tmp_path)
    wf = await WorkflowBuilder([path]).start_workflow("Flow", {}, store=store)
    assert wf.status is S.FAILED
    assert wf.state.ledger == ["Reserve", "Charge"]  # nothing undone
    assert wf.progress.failed_step == "Ship"
    alerts = await outbox(store, wf.id, "alert")
    assert [a["alert"] for a in alerts] == ["failed_after_pivot"]
    assert "pivot 'Charge'" in alerts[0]["message"]
    assert "'Ship'" in alerts[0]["message"]
    # retry resumes from the failed step, with a new builder reading the store
    again = await WorkflowBuilder([path]).load_workflow(wf.id, store)
    again.state = again.state.model_copy(update={"note": "fixed"})
    await again.retry()
    assert again.status is S.COMPLETED
    assert again.state.ledger == ["Reserve", "Charge", "Ship", "Notify"]


async def test_failure_before_the_pivot_rolls_back(tmp_path: Path, store: SQLiteStore) -> None:
    path = write(
        tmp_path,
        [
            st("Reserve"),
            st("Charge", "fail", pivot=True),
            st("Ship", undo=False, retry={"max_attempts": 2}),
        ],
    )
    wf = await WorkflowBuilder([path]).start_workflow("Flow", {}, store=store)
    assert wf.status is S.FAILED_ROLLED_BACK
    assert wf.state.ledger == ["Reserve", "undo:Reserve"]


@pytest.mark.parametrize("first", ["HUMAN_INPUT", "PARALLEL"])
async def test_a_pause_or_parallel_can_be_the_first_step(
    tmp_path: Path, store: SQLiteStore, first: str
) -> None:
    if first == "HUMAN_INPUT":
        head: dict[str, Any] = {"name": "Ask", "type": "HUMAN_INPUT"}
    else:
        head = {"name": "Both", "type": "PARALLEL", "branches": [[st("L1")], [st("R1")]]}
    path = write(tmp_path, [head, st("After", undo=False)])
    wf = await WorkflowBuilder([path]).start_workflow("Flow", {}, store=store)
    if first == "HUMAN_INPUT":
        assert wf.status is S.PAUSED
        await wf.resume(None)
        await wf.run()
    assert wf.status is S.COMPLETED
    assert wf.state.ledger[-1] == "After"


async def test_a_paused_workflow_keeps_its_leases_across_a_restart(
    tmp_path: Path, store: SQLiteStore
) -> None:
    path = tmp_path / "leased.yaml"
    body = {
        "workflow_type": "Leased",
        "workflow_version": "1.0.0",
        "initial_state_model": MODEL,
        "saga_mode": True,
        "resources": ["pump"],
        "steps": [st("Before"), {"name": "Ask", "type": "HUMAN_INPUT"}, st("After", undo=False)],
    }
    path.write_text(yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
    builder = WorkflowBuilder([path])
    wf = await builder.start_workflow("Leased", {}, store=store)
    assert wf.status is S.PAUSED
    assert builder.leases.holder("pump") == wf.id  # no worker slot, but the device stays its own
    fresh = WorkflowBuilder([path])
    assert fresh.leases.holder("pump") is None
    await fresh.rearm_pauses(store)
    assert fresh.leases.holder("pump") == wf.id
    again = await fresh.resume(store, wf.id, None)
    assert await again.run() is S.COMPLETED
    assert fresh.leases.holder("pump") is None


async def test_cancel_during_a_parallel_stops_the_branches_and_compensates(
    tmp_path: Path, store: SQLiteStore
) -> None:
    path = parallel_flow(
        tmp_path,
        [st("L1", "set_event", params={"name": "started"}), st("L2", "wait_long")],
        [st("R1", "wait_long")],
    )
    builder = WorkflowBuilder([path])
    l2_began = asyncio.Event()

    def watch(_wf: object, event: dict[str, Any]) -> None:
        if event["event"] == "step_started" and event["step"] == "L2":
            l2_began.set()

    builder.observers.append(watch)
    wf = await builder.create_workflow("Flow", {}, store=store)
    driving = asyncio.ensure_future(wf.run())
    await asyncio.wait_for(l2_began.wait(), 10)
    assert {fl.step for fl in wf.progress.running} == {"L2", "R1"}
    await wf.cancel("stop now")
    assert await asyncio.wait_for(driving, 10) is S.CANCELLED
    undone = [x for x in wf.state.ledger if x.startswith("undo:")]
    # The two stopped mid-flight first (in the order they were stopped), then L1, then Before.
    assert sorted(undone[:2]) == ["undo:L2", "undo:R1"]
    assert undone[2:] == ["undo:L1", "undo:Before"]
    assert wf.error == "stop now"


async def test_a_branch_stopped_at_its_await_is_compensated(
    tmp_path: Path, store: SQLiteStore
) -> None:
    # L1 (async) reaches its first await before R1's thread can fail: it is stopped there, and
    # since it may have taken effect, its own compensation runs before the step before.
    path = parallel_flow(tmp_path, [st("L1", "wait_long")], [st("R1", "fail")])
    wf = await WorkflowBuilder([path]).start_workflow("Flow", {}, store=store)
    assert wf.status is S.FAILED_ROLLED_BACK
    journal = await store.journal(wf.id)
    ends = {(e.step, e.phase): e.outcome for e in journal}
    assert ends[("R1", "forward")] == "failed"
    assert ends[("L1", "forward")] == "cancelled"
    assert [x for x in wf.state.ledger if x.startswith("undo:")] == ["undo:L1", "undo:Before"]
