"""
Payment workflow steps with compensation functions (the saga tutorial, with edgesaga imports).

To make a step fail without editing code, start the workflow with ``"fail_step": "<step name>"``
in its data (``edgesaga start PaymentProcessing --data '{..., "fail_step": "Create_Shipment"}'``);
``Create_Shipment`` then raises ``Exception("Carrier API unavailable")`` as in the tutorial.
"""

import uuid

from agent import StepContext
from workflows.payment.models import PaymentState

_FAILURES = {
    "Create_Order": "Order system unavailable",
    "Charge_Payment": "Payment gateway timeout",
    "Reserve_Inventory": "Inventory service unavailable",
    "Create_Shipment": "Carrier API unavailable",
}


def _maybe_fail(state: PaymentState, context: StepContext) -> None:
    if state.fail_step == context.step_name:
        raise Exception(_FAILURES.get(context.step_name, f"{context.step_name} failed"))


# ============================================================================
# STEP 1: Create Order
# ============================================================================


def create_order(state: PaymentState, context: StepContext, **kwargs) -> dict:
    """
    Create order in order management system
    """
    print(f"\n📝 Creating order for customer {state.customer_id}")
    print(f" Amount: ${state.amount:.2f} {state.currency}")
    _maybe_fail(state, context)
    # Simulate order creation
    order_ref = f"ORD-{uuid.uuid4().hex[:8].upper()}"
    print(f" ✓ Order created: {order_ref}")
    return {"order_created": True, "order_reference": order_ref, "workflow_status": "order_created"}


def cancel_order(state: PaymentState, context: StepContext, **kwargs) -> dict:
    """
    COMPENSATION: Cancel order if workflow fails
    """
    print(f"\n🔄 COMPENSATION: Canceling order {state.order_reference}")
    # Simulate order cancellation
    print(f" ✓ Order {state.order_reference} canceled")
    state.compensations_run.append("cancel_order")
    return {"order_created": False, "workflow_status": "order_canceled"}


# ============================================================================
# STEP 2: Charge Payment
# ============================================================================


def charge_payment(state: PaymentState, context: StepContext, **kwargs) -> dict:
    """
    Charge customer's payment method
    """
    print(f"\n💳 Charging payment: ${state.amount:.2f}")
    _maybe_fail(state, context)
    # Simulate payment processing
    transaction_id = f"TXN-{uuid.uuid4().hex[:12].upper()}"
    payment_method = "card_****1234"
    print(f" Payment Method: {payment_method}")
    print(f" ✓ Payment charged: {transaction_id}")
    return {
        "payment_charged": True,
        "transaction_id": transaction_id,
        "payment_method": payment_method,
        "workflow_status": "payment_charged",
    }


def refund_payment(state: PaymentState, context: StepContext, **kwargs) -> dict:
    """
    COMPENSATION: Refund payment if workflow fails
    """
    print(f"\n🔄 COMPENSATION: Refunding payment {state.transaction_id}")
    print(f" Amount: ${state.amount:.2f}")
    # Simulate refund processing
    print(f" ✓ Refund processed: {state.transaction_id}")
    state.compensations_run.append("refund_payment")
    return {"payment_charged": False, "workflow_status": "payment_refunded"}


def refund_if_approved(state: PaymentState, context: StepContext, **kwargs) -> dict:
    """
    COMPENSATION of PaymentWithApproval: refund only what a person approved (Approve_Refund);
    without the approval it refuses, and the workflow waits for a person (COMPENSATION_FAILED,
    with an alert) instead of moving money on its own.
    """
    if not getattr(state, "refund_approved", False):
        raise Exception(
            f"Refund of {state.transaction_id} needs a person's approval and Approve_Refund did "
            "not approve it; a person refunds it by hand"
        )
    print(f"\n🔄 COMPENSATION: Refund approved by {getattr(state, 'approved_by', None)}")
    return refund_payment(state, context, **kwargs)


# ============================================================================
# STEP 3: Reserve Inventory
# ============================================================================


def reserve_inventory(state: PaymentState, context: StepContext, **kwargs) -> dict:
    """
    Reserve inventory for order
    """
    print(f"\n📦 Reserving inventory for order {state.order_reference}")
    _maybe_fail(state, context)
    # Simulate inventory reservation
    reservation_id = f"RES-{uuid.uuid4().hex[:8].upper()}"
    print(f" ✓ Inventory reserved: {reservation_id}")
    return {
        "inventory_reserved": True,
        "reservation_id": reservation_id,
        "workflow_status": "inventory_reserved",
    }


def release_inventory(state: PaymentState, context: StepContext, **kwargs) -> dict:
    """
    COMPENSATION: Release inventory reservation if workflow fails
    """
    print(f"\n🔄 COMPENSATION: Releasing inventory {state.reservation_id}")
    # Simulate inventory release
    print(f" ✓ Inventory released: {state.reservation_id}")
    state.compensations_run.append("release_inventory")
    return {"inventory_reserved": False, "workflow_status": "inventory_released"}


# ============================================================================
# STEP 4: Create Shipment
# ============================================================================


def create_shipment(state: PaymentState, context: StepContext, **kwargs) -> dict:
    """
    Create shipment with carrier
    """
    print(f"\n📮 Creating shipment for order {state.order_reference}")
    # SIMULATE FAILURE HERE (for testing compensation): start with fail_step="Create_Shipment"
    _maybe_fail(state, context)
    # Simulate shipment creation
    tracking_number = f"TRACK-{uuid.uuid4().hex[:10].upper()}"
    print(f" ✓ Shipment created: {tracking_number}")
    return {
        "shipment_created": True,
        "tracking_number": tracking_number,
        "workflow_status": "completed",
    }


def cancel_shipment(state: PaymentState, context: StepContext, **kwargs) -> dict:
    """
    COMPENSATION: Cancel shipment if workflow fails
    """
    print(f"\n🔄 COMPENSATION: Canceling shipment {state.tracking_number}")
    # Simulate shipment cancellation
    print(f" ✓ Shipment canceled: {state.tracking_number}")
    state.compensations_run.append("cancel_shipment")
    return {"shipment_created": False, "workflow_status": "shipment_canceled"}
