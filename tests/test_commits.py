"""Commits per workflow: however a workflow is started, the first step's "started" record commits
with the instance row, so ``create_workflow`` followed by ``run``/``next_step`` (the tutorial's
path, and every start command) costs what ``start_workflow`` costs.

``SQLiteStore.commits`` counts the transactions the store's writer committed; one workflow runs at
a time here, so no two of its writes share a transaction.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from _engine_fixtures import PAYMENT_DATA, PAYMENT_DIR, PAYMENT_STEPS

from agent import SQLiteStore, WorkflowBuilder, WorkflowStatus
from agent._control import Control
from agent._runner import Runner

FLAGS = ("order_created", "payment_charged", "inventory_reserved", "shipment_created")


@pytest.fixture
def builder() -> WorkflowBuilder:
    """The bundled payment saga, the tutorial's workflow."""
    return WorkflowBuilder(definitions=[PAYMENT_DIR])


def payment(fail_step: str | None) -> dict[str, Any]:
    return {**PAYMENT_DATA, **({"fail_step": fail_step} if fail_step else {})}


async def commits_of_start_workflow(
    builder: WorkflowBuilder, store: SQLiteStore, fail_step: str | None
) -> int:
    before = store.commits
    wf = await builder.start_workflow(
        "PaymentProcessing", payment(fail_step), store=store, saga_mode=True
    )
    assert wf.status is (
        WorkflowStatus.FAILED_ROLLED_BACK if fail_step else WorkflowStatus.COMPLETED
    )
    return store.commits - before


@pytest.mark.parametrize("fail_step", [None, "Create_Shipment"], ids=["completes", "rolls-back"])
async def test_create_then_run_commits_as_often_as_start_workflow(
    builder: WorkflowBuilder, store: SQLiteStore, fail_step: str | None
) -> None:
    expected = await commits_of_start_workflow(builder, store, fail_step)
    before = store.commits
    wf = await builder.create_workflow(
        "PaymentProcessing", payment(fail_step), store=store, saga_mode=True
    )
    await wf.run()
    assert store.commits - before == expected
    # One commit per step attempt (and per compensation) plus the instance row's: the target.
    steps = len(PAYMENT_STEPS)
    attempts = steps if fail_step is None else steps + (steps - 1)
    assert expected == attempts + 1


async def test_the_tutorials_next_step_loop_commits_as_often_as_start_workflow(
    builder: WorkflowBuilder, store: SQLiteStore
) -> None:
    expected = await commits_of_start_workflow(builder, store, None)
    before = store.commits
    wf = await builder.create_workflow("PaymentProcessing", payment(None), store=store)
    wf.enable_saga_mode()
    while wf.status == "ACTIVE":
        await wf.next_step()
    assert wf.status is WorkflowStatus.COMPLETED
    assert store.commits - before == expected
    rec = await store.load_instance(wf.id)
    assert rec is not None
    assert rec.progress.get("saga") is True  # the flag set after create still reached the journal


async def send(control: Control, command: str, **body: Any) -> dict[str, Any]:
    reply, _ = await control.handle_raw(command, json.dumps(body).encode())
    return reply


async def test_a_start_command_commits_as_often_as_start_workflow(
    builder: WorkflowBuilder, store: SQLiteStore
) -> None:
    expected = await commits_of_start_workflow(builder, store, None)
    runner = Runner(max_concurrent=2)
    serving = asyncio.create_task(runner.serve())
    try:
        control = Control(builder=builder, store=store, runner=runner)
        before = store.commits
        reply = await send(
            control,
            "start",
            request_id="r-1",
            workflow_type="PaymentProcessing",
            data=PAYMENT_DATA,
            saga=True,
        )
        assert reply["ok"] is True, reply
        wf = builder.live(reply["workflow_id"])
        assert wf is not None
        assert await asyncio.wait_for(wf.wait(), 10) is WorkflowStatus.COMPLETED
        assert store.commits - before == expected  # the request's reply rode on the first commit
    finally:
        await runner.stop(grace=0.5)
        serving.cancel()


async def test_a_workflow_cancelled_before_its_first_step_ran_never_runs_it(
    builder: WorkflowBuilder, store: SQLiteStore
) -> None:
    wf = await builder.create_workflow(
        "PaymentProcessing", payment(None), store=store, saga_mode=True
    )
    assert await wf.cancel("changed my mind") is WorkflowStatus.CANCELLED
    assert not any(getattr(wf.state, flag) for flag in FLAGS)
    journal = [(e.phase, e.step, e.outcome) for e in await store.journal(wf.id)]
    assert all(outcome != "completed" and phase == "forward" for phase, _, outcome in journal)
    rec = await store.load_instance(wf.id)
    assert rec is not None
    assert rec.status is WorkflowStatus.CANCELLED
    assert rec.progress.get("inflight") is None


async def test_a_start_cancelled_while_it_waits_for_the_runner_never_runs(
    builder: WorkflowBuilder, store: SQLiteStore
) -> None:
    runner = Runner(max_concurrent=1)  # not serving yet: the start waits in its queue
    control = Control(builder=builder, store=store, runner=runner)
    reply = await send(
        control, "start", request_id="r-q", workflow_type="PaymentProcessing", data=PAYMENT_DATA
    )
    assert reply["ok"] is True, reply
    assert runner.queued == 1
    cancelled = await send(control, "cancel", request_id="r-c", workflow_id=reply["workflow_id"])
    assert cancelled["ok"] is True, cancelled
    wf = builder.live(reply["workflow_id"])
    assert wf is not None
    serving = asyncio.create_task(runner.serve())
    try:
        assert await asyncio.wait_for(wf.wait(), 10) is WorkflowStatus.CANCELLED
    finally:
        await runner.stop(grace=0.5)
        serving.cancel()
    assert not any(getattr(wf.state, flag) for flag in FLAGS)
    assert "completed" not in [e.outcome for e in await store.journal(wf.id)]


async def test_a_created_workflow_dropped_and_loaded_again_is_the_same_unrun_one(
    builder: WorkflowBuilder, store: SQLiteStore
) -> None:
    wid = (await builder.create_workflow("PaymentProcessing", payment(None), store=store)).id
    wf = await builder.load_workflow(wid, store)
    assert await wf.run() is WorkflowStatus.COMPLETED
    journal = [(e.step, e.attempt, e.outcome) for e in await store.journal(wid)]
    assert journal == [(step, 1, "completed") for step in PAYMENT_STEPS]  # nothing interrupted


async def test_a_created_workflow_driven_by_another_builder_counts_its_first_attempt_cut_short(
    builder: WorkflowBuilder, store: SQLiteStore
) -> None:
    wid = (await builder.create_workflow("PaymentProcessing", payment(None), store=store)).id
    other = WorkflowBuilder(definitions=[PAYMENT_DIR])  # as after a restart, without recover()
    wf = await other.load_workflow(wid, store)
    assert await wf.run() is WorkflowStatus.COMPLETED
    journal = [(e.step, e.attempt, e.outcome) for e in await store.journal(wid)]
    first = PAYMENT_STEPS[0]
    assert journal[:2] == [(first, 1, "interrupted"), (first, 2, "completed")]
    assert [outcome for _, _, outcome in journal[2:]] == ["completed"] * (len(PAYMENT_STEPS) - 1)
