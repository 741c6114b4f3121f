"""State and input models of the control-flow test workflows."""

from __future__ import annotations

from pydantic import BaseModel, Field


class FlowState(BaseModel):
    """What the control-flow test steps read and write."""

    ledger: list[str] = []
    route: str | None = None
    approved: bool = False
    note: str | None = None
    count: int = 0
    a: int = 0
    b: int = 0


class Approval(BaseModel):
    """The input of an approval step."""

    approved: bool = Field(True, description="Go on with the refund.")
    note: str | None = Field(None, description="Why.")


class WrongTypeInput(BaseModel):
    """``approved`` as text: does not fit FlowState.approved."""

    approved: str = "yes"


class UnknownFieldInput(BaseModel):
    """``colour`` is no field of FlowState."""

    colour: str = "red"


class NotAModel:
    """Not a pydantic model."""
