"""State and input models of the control-flow crash and property workflows."""

from __future__ import annotations

from pydantic import BaseModel


class FlowState(BaseModel):
    """State of the crash workflows: the steps note their progress in ``ledger`` (a file, fsynced,
    so it survives SIGKILL) and look beside it for files that make them wait or fail."""

    ledger: str
    route: str = "b"  # what the DECISION step returns
    approved: bool = False  # set by resuming the HUMAN_INPUT step
    note: str = ""  # idem


class Approval(BaseModel):
    """What the HUMAN_INPUT step of FlowPause waits for."""

    approved: bool = False
    note: str = ""


class PropState(BaseModel):
    """State of the generated property workflows (their steps keep their record in memory)."""

    approved: bool = False


class PropApproval(BaseModel):
    """Input model of the generated HUMAN_INPUT steps."""

    approved: bool = False
