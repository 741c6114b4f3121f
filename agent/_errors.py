"""One error tree for the agent, rooted at :class:`AgentError`.

Each error carries the ``code`` its command reply gives (see :func:`agent._messages.error_reply`):
a command refused for any of these reasons is answered the same way on every path.
"""

from __future__ import annotations


class AgentError(Exception):
    """Root of every error edgesaga raises on purpose."""

    #: The error code of the reply to a command that fails with this error.
    code = "internal_error"


class DefinitionError(AgentError, ValueError):
    """Raised when a workflow definition (YAML) is malformed, unknown keys included.

    ``path`` is the file, ``step`` the step name (or None), ``key`` the offending key (or None),
    ``line`` the 1-based line in the file when known.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        step: str | None = None,
        key: str | None = None,
        line: int | None = None,
    ) -> None:
        self.path = path
        self.step = step
        self.key = key
        self.line = line
        where = []
        if path:
            where.append(f"{path}:{line}" if line else path)
        if step:
            where.append(f"step {step!r}")
        if key:
            where.append(f"key {key!r}")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.reason = message


class UnknownWorkflowType(AgentError, KeyError):
    """Raised when a workflow type is not among the loaded definitions."""

    code = "unknown_workflow_type"

    def __init__(self, workflow_type: str, known: list[str]) -> None:
        self.workflow_type = workflow_type
        self.known = known
        super().__init__(workflow_type)

    def __str__(self) -> str:
        known = ", ".join(sorted(self.known)) or "none"
        return (
            f"Unknown workflow type {self.workflow_type!r}. Loaded types: {known}. "
            "Add its YAML to the definition paths and restart."
        )


class InvalidData(AgentError, ValueError):
    """Raised when initial data or a step's result does not fit the workflow's state model."""

    code = "invalid_data"

    def __init__(self, message: str, *, workflow_type: str | None = None) -> None:
        self.workflow_type = workflow_type
        super().__init__(message)


class InvalidInput(AgentError, ValueError):
    """Raised when the input sent to resume a PAUSED workflow does not fit its step's
    ``input_model``; the workflow stays PAUSED."""

    code = "invalid_input"

    def __init__(self, message: str, *, workflow_id: str | None = None, field: str | None = None):
        super().__init__(message)
        self.workflow_id = workflow_id
        self.field = field


class WorkflowNotFound(AgentError, LookupError):
    """Raised when no workflow instance has the given id in the store."""

    code = "not_found"

    def __init__(self, workflow_id: str) -> None:
        self.workflow_id = workflow_id
        super().__init__(f"No workflow with id {workflow_id!r} in this database.")


class WorkflowNotActive(AgentError, RuntimeError):
    """Raised when ``next_step()`` (or another forward operation) is called on a workflow that is not
    ``ACTIVE``."""

    def __init__(self, workflow_id: str, status: str, action: str = "run the next step") -> None:
        self.workflow_id = workflow_id
        self.status = status
        super().__init__(
            f"Workflow {workflow_id} is {status}, so it cannot {action}; "
            "only ACTIVE workflows move forward."
        )


class InvalidTransition(AgentError, RuntimeError):
    """Raised when an operator request (cancel, retry, resume) does not apply to the workflow's status."""

    code = "invalid_transition"

    def __init__(self, workflow_id: str, status: str, message: str) -> None:
        self.workflow_id = workflow_id
        self.status = status
        super().__init__(message)


class StepTimeout(AgentError, TimeoutError):
    """Raised when a step outlives its ``timeout`` (and recorded as the step's error)."""

    def __init__(self, workflow_id: str, step: str, timeout: float) -> None:
        self.workflow_id = workflow_id
        self.step = step
        self.timeout = timeout
        super().__init__(f"Step {step!r} did not finish within its timeout of {timeout:g} s.")


class DeadlineMissed(AgentError, RuntimeError):
    """Raised when a step with ``max_lateness`` would start too long after the step before it
    finished (an outage): it does not run, and fails with this sentence (saga rules apply)."""

    code = "deadline_missed"

    def __init__(self, step: str, previous: str, max_lateness: float, late: float | None) -> None:
        self.step = step
        self.previous = previous
        self.max_lateness = max_lateness
        self.late = late
        if late is None:
            message = (
                f"Step {step!r} would start after a reboot on a clock that was not synchronized "
                f"at both ends, so the time since {previous!r} finished is unknown; it counts as "
                f"beyond its max_lateness of {max_lateness:g} s and did not run."
            )
        else:
            message = (
                f"Step {step!r} started {late:.0f} s after {previous!r} finished, beyond its "
                f"max_lateness of {max_lateness:g} s; it did not run."
            )
        super().__init__(message)


class StoreError(AgentError, RuntimeError):
    """Raised when the database cannot be used (locked by another agent, newer schema, disk full)."""


class DatabaseLocked(StoreError):
    """Raised when another process already drives this database."""

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(
            f"Another edgesaga process already drives {path}. Stop it first, or use the "
            "CLI against it (edgesaga talks to the running agent through its control socket)."
        )


class DiskFull(StoreError):
    """Raised when SQLite reports a full disk; work pauses instead of corrupting state."""

    code = "disk_full"
