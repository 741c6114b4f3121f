"""The PaymentProcessing part of ``edgesaga demo``: the saga tutorial's run, once succeeding and
once with the carrier failing, told as the tutorial tells it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent import SQLiteStore, Workflow, WorkflowBuilder, WorkflowStatus

RULE = "=" * 70
HERE = Path(__file__).parent
ORDER: dict[str, Any] = {
    "order_id": "ORD-12345",
    "customer_id": "CUST-789",
    "amount": 299.99,
    "currency": "USD",
}


def _print_final_state(wf: Workflow) -> None:
    state: Any = wf.state  # a PaymentState (workflows/payment/models.py)
    print("\n" + RULE)
    print(" FINAL STATE")
    print(RULE + "\n")
    print(f"Workflow ID: {wf.id}")
    print(f"Status: {wf.status.value}")
    print(f"Order Reference: {state.order_reference}")
    print("\nStep Results:")
    print(f" Order Created: {state.order_created}")
    print(f" Payment Charged: {state.payment_charged}")
    print(f" Inventory Reserved: {state.inventory_reserved}")
    print(f" Shipment Created: {state.shipment_created}")
    if state.compensations_run:
        print("\n⚠️ Compensations Run:")
        for comp in state.compensations_run:
            print(f" - {comp}")
    else:
        print("\n✅ No compensations needed")
    print(f"\nFinal Workflow Status: {state.workflow_status}")


async def _one(builder: WorkflowBuilder, store: SQLiteStore, *, fail: bool) -> Workflow:
    print("\n" + RULE)
    print(" PROCESSING PAYMENT" + ("  (carrier API will fail)" if fail else ""))
    print(RULE)
    data = {**ORDER, "fail_step": "Create_Shipment"} if fail else dict(ORDER)
    wf = await builder.create_workflow("PaymentProcessing", initial_data=data, store=store)
    wf.enable_saga_mode()
    print("✓ Saga mode enabled (compensation active)")

    def banner(workflow: Workflow, event: dict[str, Any]) -> None:
        if (
            workflow is wf
            and event["event"] == "status_changed"
            and event["status"] == "COMPENSATING"
        ):
            print("\n" + RULE)
            print(" WORKFLOW FAILED - INITIATING ROLLBACK")
            print(RULE)

    builder.observers.append(banner)
    try:
        while wf.status == "ACTIVE":
            await wf.next_step()
    finally:
        builder.observers.remove(banner)
    if wf.status == "COMPLETED":
        print("\n" + RULE)
        print(" WORKFLOW COMPLETED SUCCESSFULLY")
        print(RULE)
    _print_final_state(wf)
    return wf


async def run_demo(store: SQLiteStore) -> tuple[list[bool], list[str]]:
    """Run the payment demo: whether each run ended as it should, and the summary's lines."""
    builder = WorkflowBuilder(definitions=[HERE])
    ok = await _one(builder, store, fail=False)
    bad = await _one(builder, store, fail=True)
    return (
        [ok.status is WorkflowStatus.COMPLETED, bad.status is WorkflowStatus.FAILED_ROLLED_BACK],
        [
            f"PaymentProcessing (success path): {ok.status.value}",
            f"PaymentProcessing (carrier fails): {bad.status.value}",
        ],
    )


async def run_approval_demo(store: SQLiteStore) -> tuple[list[bool], list[str]]:
    """PaymentWithApproval (``edgesaga demo payment``): the order pauses for a refund approval, a
    wrong answer is refused naming the field, the approval resumes it, the carrier fails and the
    approved refund is made in the rollback."""
    from agent import AgentError

    builder = WorkflowBuilder(definitions=[HERE])
    print("\n" + RULE)
    print(" PAYMENT WITH REFUND APPROVAL  (carrier API will fail)")
    print(RULE)
    data = {**ORDER, "fail_step": "Create_Shipment"}
    wf = await builder.start_workflow("PaymentWithApproval", data, store=store)
    waiting = builder.waiting_input(wf) or {}
    fields = ", ".join((waiting.get("schema") or {}).get("properties", {}))
    print(f"\n⏸️  {wf.status.value} at {wf.current_step}: waiting for {fields}")
    print(f"   (edgesaga resume {wf.id} --data '{{\"refund_approved\": true}}', or the button)")
    try:
        await builder.resume(store, wf.id, {"refund_approved": "maybe"})
        refused = False
    except AgentError as exc:
        refused = True
        print(f'\n✋ resume with refund_approved="maybe" refused: {exc}')
    wf = await builder.resume(store, wf.id, {"refund_approved": True, "approved_by": "demo"})
    print("\n✓ Refund approved by demo; the workflow goes on")
    await wf.run()
    _print_final_state(wf)
    ok = wf.status is WorkflowStatus.FAILED_ROLLED_BACK and refused
    state: Any = wf.state  # an ApprovalPaymentState (workflows/payment/models.py)
    return (
        [ok, "refund_payment" in state.compensations_run],
        [
            f"PaymentWithApproval (approved, carrier fails): {wf.status.value}, refund approved and made"
        ],
    )
