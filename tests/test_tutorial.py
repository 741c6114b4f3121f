"""The saga tutorial (seed/saga-tutorial.txt) as a test, with edgesaga's import paths.

Each test follows the tutorial's ``main.py``: create the workflow, ``enable_saga_mode()``, then
``while workflow.status == "ACTIVE": await workflow.next_step()``. A failure is injected with the
payment example's ``fail_step`` field instead of uncommenting a ``raise``.
"""

from __future__ import annotations

import pytest
from _engine_fixtures import PAYMENT_DATA, PAYMENT_DIR, PAYMENT_STEPS

from agent import SQLiteStore, Workflow, WorkflowBuilder, WorkflowStatus

FLAGS = ("order_created", "payment_charged", "inventory_reserved", "shipment_created")


@pytest.fixture
def builder() -> WorkflowBuilder:
    return WorkflowBuilder(definitions=[PAYMENT_DIR])


async def run_tutorial(
    builder: WorkflowBuilder, store: SQLiteStore, *, fail_step: str | None = None, saga: bool = True
) -> Workflow:
    data = dict(PAYMENT_DATA)
    if fail_step is not None:
        data["fail_step"] = fail_step
    workflow = await builder.create_workflow("PaymentProcessing", data, store=store)
    if saga:
        workflow.enable_saga_mode()
    calls = 0
    while workflow.status == "ACTIVE":
        await workflow.next_step()
        calls += 1
        assert calls <= len(PAYMENT_STEPS), "next_step() did not make progress"
    return workflow


async def forward_log(store: SQLiteStore, workflow: Workflow) -> list[tuple[str, str, str]]:
    return [(e.phase, e.step, e.outcome) for e in await store.journal(workflow.id)]


def test_status_enum_has_exactly_the_contract_values() -> None:
    assert {s.value for s in WorkflowStatus} == {
        "ACTIVE",
        "PAUSED",
        "COMPLETED",
        "FAILED",
        "COMPENSATING",
        "FAILED_ROLLED_BACK",
        "COMPENSATION_FAILED",
        "CANCELLED",
    }
    assert len(WorkflowStatus) == 8
    assert isinstance(WorkflowStatus.ACTIVE, str)
    assert WorkflowStatus.ACTIVE == "ACTIVE"
    assert WorkflowStatus("FAILED_ROLLED_BACK") is WorkflowStatus.FAILED_ROLLED_BACK


async def test_success(
    builder: WorkflowBuilder, store: SQLiteStore, capsys: pytest.CaptureFixture[str]
) -> None:
    workflow = await run_tutorial(builder, store)

    assert workflow.status == "COMPLETED"
    assert workflow.status is WorkflowStatus.COMPLETED
    assert workflow.state.compensations_run == []
    assert all(getattr(workflow.state, f) for f in FLAGS)
    assert workflow.state.order_reference.startswith("ORD-")
    assert workflow.state.tracking_number.startswith("TRACK-")
    assert workflow.state.workflow_status == "completed"
    assert await forward_log(store, workflow) == [
        ("forward", name, "completed") for name in PAYMENT_STEPS
    ]
    out = capsys.readouterr().out
    for line in ("Creating order", "Payment charged", "Inventory reserved", "Shipment created"):
        assert line in out
    assert "COMPENSATION" not in out

    # What the tutorial prints at the end is what the store has.
    record = await store.load_instance(workflow.id)
    assert record is not None
    assert record.status is WorkflowStatus.COMPLETED
    assert record.state["shipment_created"] is True


async def test_failure_at_shipment_rolls_back_in_reverse_order(
    builder: WorkflowBuilder, store: SQLiteStore, capsys: pytest.CaptureFixture[str]
) -> None:
    workflow = await run_tutorial(builder, store, fail_step="Create_Shipment")

    assert workflow.status == "FAILED_ROLLED_BACK"
    assert workflow.state.compensations_run == [
        "release_inventory",
        "refund_payment",
        "cancel_order",
    ]
    assert not any(getattr(workflow.state, f) for f in FLAGS)
    assert "Carrier API unavailable" in (workflow.error or "")
    assert await forward_log(store, workflow) == [
        ("forward", "Create_Order", "completed"),
        ("forward", "Charge_Payment", "completed"),
        ("forward", "Reserve_Inventory", "completed"),
        ("forward", "Create_Shipment", "failed"),
        ("compensate", "Reserve_Inventory", "completed"),
        ("compensate", "Charge_Payment", "completed"),
        ("compensate", "Create_Order", "completed"),
    ]
    out = capsys.readouterr().out
    assert "Canceling shipment" not in out  # cancel_shipment never ran: the shipment never existed
    releasing, refunding, canceling = (
        out.index("Releasing inventory"),
        out.index("Refunding payment"),
        out.index("Canceling order"),
    )
    assert releasing < refunding < canceling

    record = await store.load_instance(workflow.id)
    assert record is not None
    assert record.status is WorkflowStatus.FAILED_ROLLED_BACK
    assert record.state["compensations_run"] == workflow.state.compensations_run


async def test_failure_without_saga_mode_undoes_nothing(
    builder: WorkflowBuilder, store: SQLiteStore
) -> None:
    workflow = await run_tutorial(builder, store, fail_step="Create_Shipment", saga=False)

    assert workflow.status == "FAILED"
    assert workflow.state.compensations_run == []
    assert workflow.state.order_created
    assert workflow.state.payment_charged
    assert workflow.state.inventory_reserved
    assert not workflow.state.shipment_created
    journal = await forward_log(store, workflow)
    assert [p for p, _, _ in journal] == ["forward"] * 4
    assert journal[-1] == ("forward", "Create_Shipment", "failed")


async def test_first_step_failure_in_saga_mode_has_nothing_to_undo(
    builder: WorkflowBuilder, store: SQLiteStore
) -> None:
    workflow = await run_tutorial(builder, store, fail_step="Create_Order")

    assert workflow.status == "FAILED_ROLLED_BACK"
    assert workflow.state.compensations_run == []
    assert not any(getattr(workflow.state, f) for f in FLAGS)
    assert await forward_log(store, workflow) == [("forward", "Create_Order", "failed")]


async def test_saga_flag_is_stored(builder: WorkflowBuilder, store: SQLiteStore) -> None:
    """``enable_saga_mode()`` after create is stored with the next commit, so a reload keeps it."""
    workflow = await run_tutorial(builder, store, fail_step="Charge_Payment")
    assert workflow.status == "FAILED_ROLLED_BACK"
    fresh = await WorkflowBuilder(definitions=[PAYMENT_DIR]).load_workflow(workflow.id, store)
    assert fresh.saga_mode is True
    assert fresh.state.compensations_run == ["cancel_order"]
