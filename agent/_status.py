"""Workflow statuses: the values stored in the database and sent over MQTT."""

from __future__ import annotations

from enum import StrEnum


class WorkflowStatus(StrEnum):
    """Status of a workflow instance; a ``str`` so ``workflow.status == "ACTIVE"`` works."""

    ACTIVE = "ACTIVE"
    PAUSED = "PAUSED"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    COMPENSATING = "COMPENSATING"
    FAILED_ROLLED_BACK = "FAILED_ROLLED_BACK"
    COMPENSATION_FAILED = "COMPENSATION_FAILED"
    CANCELLED = "CANCELLED"

    @property
    def is_terminal(self) -> bool:
        """True when nothing more will run without an operator (``retry``) asking for it."""
        return self not in _RUNNING


_RUNNING = frozenset({WorkflowStatus.ACTIVE, WorkflowStatus.PAUSED, WorkflowStatus.COMPENSATING})
#: Statuses that recovery resumes after a restart.
RESUMABLE = frozenset({WorkflowStatus.ACTIVE, WorkflowStatus.COMPENSATING})
