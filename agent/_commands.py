"""Operator commands: one pydantic model per command, whichever path it comes by (MQTT, the
control socket, the CLI without an agent); :class:`agent._control.Control` carries each out.

Input is hostile: :func:`parse_command` turns any payload into a command or a
:class:`CommandError` carrying an error ``code`` and a sentence, never an unhandled exception.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from agent._errors import AgentError
from agent._messages import error_reply
from agent._status import WorkflowStatus

RequestId = Annotated[str, StringConstraints(min_length=1, max_length=200)]
WorkflowId = Annotated[
    str, StringConstraints(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:\-]+$")
]
Topic = Annotated[str, StringConstraints(min_length=1, max_length=500, pattern=r"^[^#+\x00]+$")]

DEFAULT_MAX_PAYLOAD = 64 * 1024


class _Command(BaseModel):
    # defer_build: a model's validator is built when it first validates, not at import. An idle
    # agent answers `status` (a health check, the CLI) and so imports this module, but builds only
    # the commands it is sent (~0.2 MB of RSS for the others; docs/benchmarks.md, Footprint).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, defer_build=True)

    request_id: RequestId
    reply_to: Topic | None = None


class StartCommand(_Command):
    """Start a workflow of a type loaded from local YAML."""

    command: Literal["start"] = "start"
    workflow_type: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    data: dict[str, Any] = Field(default_factory=dict)
    workflow_id: WorkflowId | None = None
    saga: bool | None = None


class CancelCommand(_Command):
    """Cancel a workflow; in saga mode its completed steps are compensated first."""

    command: Literal["cancel"] = "cancel"
    workflow_id: WorkflowId
    reason: Annotated[str, StringConstraints(max_length=500)] | None = None


class ResumeCommand(_Command):
    """Resume a PAUSED workflow with input data."""

    command: Literal["resume"] = "resume"
    workflow_id: WorkflowId
    data: dict[str, Any] = Field(default_factory=dict)


class RetryCommand(_Command):
    """Retry a FAILED or COMPENSATION_FAILED workflow."""

    command: Literal["retry"] = "retry"
    workflow_id: WorkflowId


class GetCommand(_Command):
    """One workflow's snapshot, state and journal."""

    command: Literal["get"] = "get"
    workflow_id: WorkflowId
    journal: bool = True


def _zoned_time(text: str) -> str:
    """An ISO 8601 time with its zone, the form a reply's times take (``2026-12-01T10:00:00Z``):
    a time without one would mean another instant on a device in another zone."""
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{_shown(text)!r} is not an ISO 8601 time such as 2026-12-01T10:00:00Z"
        ) from None
    if at.tzinfo is None:
        raise ValueError(f"{_shown(text)!r} has no zone; add one, as in 2026-12-01T10:00:00Z")
    return text


def _epoch(text: str | None) -> float | None:
    return None if text is None else datetime.fromisoformat(text).timestamp()


#: A time of ``list``'s ``since`` and ``until``.
ZonedTime = Annotated[
    str, StringConstraints(min_length=1, max_length=40), AfterValidator(_zoned_time)
]
#: A ``next_cursor`` a list reply gave (URL-safe base64).
Cursor = Annotated[
    str, StringConstraints(min_length=1, max_length=400, pattern=r"^[A-Za-z0-9_-]+$")
]


class ListCommand(_Command):
    """Workflows, newest first, filtered by status, type and creation time, a page at a time:
    a reply's ``next_cursor`` (null after the last page) asks for the page after it."""

    command: Literal["list"] = "list"
    # Not strict: over JSON a status is its string value ("ACTIVE"), which a strict enum refuses.
    status: list[Annotated[WorkflowStatus, Field(strict=False)]] | None = Field(None, max_length=20)
    workflow_type: Annotated[str, StringConstraints(max_length=200)] | None = None
    #: Created after ``since`` and before ``until`` (both excluded).
    since: ZonedTime | None = None
    until: ZonedTime | None = None
    limit: int = Field(50, ge=1, le=1000)
    cursor: Cursor | None = None

    @model_validator(mode="after")
    def _window(self) -> ListCommand:
        since, until = self.window()
        if since is not None and until is not None and since >= until:
            raise ValueError("since must be before until")
        return self

    def window(self) -> tuple[float | None, float | None]:
        """``since`` and ``until`` as epoch seconds (None where not given)."""
        return _epoch(self.since), _epoch(self.until)

    def bad_cursor(self) -> str:
        """The sentence of a cursor the store cannot continue from."""
        return (
            f"Invalid list command: cursor {_shown(self.cursor or '', 40)!r} is not one this "
            "agent gave; ask again without a cursor to start from the newest."
        )


class ScheduledStart(StartCommand):
    """A schedule's fire, started as a start command is (never parsed from a payload: only the
    agent's scheduler makes one). ``fire`` is ``(schedule name, slot key)``, recorded with the
    workflow in the transaction that creates it."""

    fire: tuple[str, str]


class SchedulesCommand(_Command):
    """Each schedule of the agent config: its next fire time and its last run."""

    command: Literal["schedules"] = "schedules"
    request_id: RequestId | None = None  # type: ignore[assignment]  # a read: none needed


class _LocalCommand(_Command):
    """A command of the control socket only (the device's own operator): no request id needed."""

    request_id: RequestId | None = None  # type: ignore[assignment]


class PinsCommand(_LocalCommand):
    """The board's pins; with ``history`` (mock pins) every state each pin took."""

    command: Literal["pins"] = "pins"
    history: bool = False


class SetInputCommand(_LocalCommand):
    """Drive a mock input (desktop simulation); the board parses ``value`` strictly."""

    command: Literal["set_input"] = "set_input"
    device: Annotated[str, StringConstraints(max_length=200)]
    value: Any


class StatusCommand(_LocalCommand):
    """The agent's own state: queue, counts by status, the MQTT link, the clock's sync and the
    timers that wait on it (also over MQTT: ``cmd/status``)."""

    command: Literal["status"] = "status"


Command = (
    StartCommand
    | CancelCommand
    | ResumeCommand
    | RetryCommand
    | GetCommand
    | ListCommand
    | PinsCommand
    | SetInputCommand
    | StatusCommand
    | SchedulesCommand
)

#: The commands MQTT takes.
COMMANDS: dict[str, type[_Command]] = {
    "start": StartCommand,
    "cancel": CancelCommand,
    "resume": ResumeCommand,
    "retry": RetryCommand,
    "get": GetCommand,
    "list": ListCommand,
    "schedules": SchedulesCommand,
    "status": StatusCommand,
}

#: The commands whose accepted reply is stored with their request id (a repeat gets it again).
CHANGES = frozenset({"start", "cancel", "resume", "retry"})

#: The commands the control socket takes: those of MQTT, and the device's own.
LOCAL_COMMANDS: dict[str, type[_Command]] = {
    **COMMANDS,
    "pins": PinsCommand,
    "set_input": SetInputCommand,
}

#: Error codes a reply may carry.
ERROR_CODES = (
    "payload_too_large",
    "invalid_json",
    "unknown_command",
    "invalid_command",
    "unknown_workflow_type",
    "invalid_data",
    "invalid_input",
    "not_found",
    "invalid_transition",
    "request_id_conflict",
    "no_hardware",
    "disk_full",
    "internal_error",
)


class CommandError(AgentError, ValueError):
    """Raised when a command cannot be parsed or carried out; becomes an error reply.

    ``code`` is one of :data:`ERROR_CODES`; ``request_id`` and ``reply_to`` are whatever could be
    read from the payload (so an error reply can still reach the caller).
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        request_id: str | None = None,
        reply_to: str | None = None,
    ) -> None:
        self.code = code
        self.message = message
        self.request_id = request_id
        self.reply_to = reply_to
        super().__init__(message)

    def reply(self) -> dict[str, Any]:
        return error_reply(self.request_id, self.code, self.message)


def invalid_json(exc: BaseException) -> CommandError:
    """The error of a payload (or socket line) that is not JSON, on every path alike."""
    return CommandError(
        "invalid_json", f"The payload is not valid UTF-8 JSON ({exc.__class__.__name__})."
    )


def _shown(text: str, limit: int = 80) -> str:
    """User input as it may appear in an error message: one line (control characters escaped)
    and at most ``limit`` characters, so a message can neither forge log lines nor echo a 60 kB
    field name back."""
    if not text.isprintable():
        text = text.encode("unicode_escape", "backslashreplace").decode("ascii")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _repr(value: Any) -> str:
    try:
        return repr(value)
    except ValueError:  # an integer of more digits than int() converts to text
        return f"<{type(value).__name__}>"


def _peek(obj: Any, key: str) -> str | None:
    if isinstance(obj, dict):
        value = obj.get(key)
        if isinstance(value, str) and 0 < len(value) <= 500:
            return value
    return None


def parse_command(
    name: str,
    payload: bytes | str | dict[str, Any],
    *,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
    commands: dict[str, type[_Command]] = COMMANDS,
) -> Command:
    """Validate a command named ``name`` (the topic's last level, or the socket line's
    ``command``) with a JSON ``payload``; ``commands`` are those its path takes."""
    raw: Any
    if isinstance(payload, dict):
        raw = payload
    else:
        size = len(payload.encode() if isinstance(payload, str) else payload)
        if size > max_payload:
            raise CommandError(
                "payload_too_large",
                f"The payload is {size} bytes; the limit is {max_payload} bytes.",
            )
        try:
            raw = json.loads(payload)
        # ValueError covers JSONDecodeError, UnicodeDecodeError and an integer of more digits
        # than int() converts; RecursionError a payload nested deeper than the parser goes.
        except (ValueError, RecursionError) as exc:
            raise invalid_json(exc) from None
    request_id, reply_to = _peek(raw, "request_id"), _peek(raw, "reply_to")
    model = commands.get(name)
    if model is None:
        raise CommandError(
            "unknown_command",
            f"Unknown command {_shown(repr(name))}; use one of {', '.join(commands)}.",
            request_id=request_id,
            reply_to=reply_to,
        )
    if not isinstance(raw, dict):
        raise CommandError(
            "invalid_command",
            "A command is a JSON object with at least a request_id.",
            request_id=request_id,
            reply_to=reply_to,
        )
    body = {k: v for k, v in raw.items() if k != "command"}
    if "command" in raw and raw["command"] != name:
        raise CommandError(
            "invalid_command",
            f"The payload says command {_shown(_repr(raw['command']))} but was sent as "
            f"{_shown(repr(name))}.",
            request_id=request_id,
            reply_to=reply_to,
        )
    try:
        return model.model_validate(body)  # type: ignore[return-value]
    except ValidationError as exc:
        problems = "; ".join(
            f"{_shown('.'.join(str(p) for p in e['loc'])) if e['loc'] else '(payload)'}: "
            f"{_shown(e['msg'], 200)}"
            for e in exc.errors()[:3]
        )
        raise CommandError(
            "invalid_command",
            f"Invalid {name} command: {problems}.",
            request_id=request_id,
            reply_to=reply_to,
        ) from None
