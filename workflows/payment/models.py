"""State model of the PaymentProcessing workflow (the saga tutorial's ``PaymentState``)."""

from typing import Optional

from pydantic import BaseModel


class PaymentState(BaseModel):
    """State for payment processing workflow"""

    # Order details
    order_id: str
    customer_id: str
    amount: float
    currency: str = "USD"

    # Step results
    order_created: bool = False
    order_reference: Optional[str] = None  # noqa: UP045
    payment_charged: bool = False
    transaction_id: Optional[str] = None  # noqa: UP045
    payment_method: Optional[str] = None  # noqa: UP045
    inventory_reserved: bool = False
    reservation_id: Optional[str] = None  # noqa: UP045
    shipment_created: bool = False
    tracking_number: Optional[str] = None  # noqa: UP045

    # Compensation tracking
    compensations_run: list = []

    # Final status
    workflow_status: str = "pending"

    # Not in the tutorial: name a step here to make it fail, without editing code
    # (e.g. "Create_Shipment" raises "Carrier API unavailable").
    fail_step: Optional[str] = None  # noqa: UP045


class ApprovalPaymentState(PaymentState):
    """State of PaymentWithApproval: the tutorial's state and the refund approval (not in the
    tutorial: its "manual compensation approval for critical operations")."""

    refund_approved: bool = False
    approved_by: Optional[str] = None  # noqa: UP045


class RefundApproval(BaseModel):
    """What Approve_Refund waits for; a press of the approve button sends the defaults."""

    refund_approved: bool = True
    approved_by: str = "approve_button"
