"""The shape of every message edgesaga writes or sends, each defined once, and its one JSON encoder.

* :class:`Event` and :class:`Alert`: what the engine writes to the outbox and the link publishes on
  ``events`` and ``alerts``;
* :class:`Snapshot`: one workflow at one moment; :class:`StateSnapshot` (the retained
  ``workflows/<id>/state`` topic) and :class:`Summary` (a row of ``list``, the head of ``get``)
  extend it;
* :func:`error_reply` and :func:`ok_reply`: the reply to a command, on every path (MQTT, the
  control socket, the CLI without an agent).

This module imports nothing of the agent, so every layer may use it.
"""

from __future__ import annotations

import json
from typing import Any, Literal, TypedDict, cast

#: The encoder of everything edgesaga writes (the journal, the outbox) and sends (MQTT, the
#: control socket): compact, ASCII only (a lone surrogate read from hostile input cannot break
#: the encoding). One instance, since ``json.dumps`` with arguments builds a new one per call.
dumps = json.JSONEncoder(separators=(",", ":")).encode


class Event(TypedDict):
    """One transition of a workflow (``event``: ``workflow_started``, ``step_started``, ...,
    ``status_changed``; for that one ``status`` is the new status)."""

    seq: int | None
    at: str | None
    workflow_id: str
    workflow_type: str
    event: str
    step: str | None
    attempt: int | None
    status: str
    error: str | None


class Alert(TypedDict, total=False):
    """A condition that needs a person: ``alert`` names it, ``message`` says it in a sentence;
    the other fields depend on the alert (``compensation_failed``: ``step`` and ``error``,
    ``outbox_overflow``: ``dropped`` and ``cap``, ``disk_full``: ``database``)."""

    seq: int | None
    at: str | None
    alert: str
    workflow_id: str | None
    workflow_type: str | None
    step: str | None
    error: str | None
    message: str
    dropped: int
    cap: int
    database: str


def alert(
    kind: str, message: str, *, at: str | None, workflow_id: str | None = None, **fields: Any
) -> Alert:
    """An :class:`Alert` named ``kind``; ``fields`` are its own (``step``, ``error``, ...). Its
    ``seq`` is given when the outbox numbers it (None for one published directly)."""
    payload: dict[str, Any] = {"seq": None, "at": at, "alert": kind, "workflow_id": workflow_id}
    payload.update(fields)
    payload["message"] = message
    return cast(Alert, payload)


class Snapshot(TypedDict):
    """One workflow at one moment."""

    workflow_id: str
    workflow_type: str
    status: str
    current_step: str | None
    error: str | None


def snapshot(
    workflow_id: str,
    workflow_type: str,
    status: str,
    current_step: str | None,
    error: str | None,
) -> Snapshot:
    """A :class:`Snapshot`: what a live workflow and a stored record both report of themselves."""
    return {
        "workflow_id": workflow_id,
        "workflow_type": workflow_type,
        "status": status,
        "current_step": current_step,
        "error": error,
    }


class Summary(Snapshot):
    """A workflow as ``list`` shows it (and the head of a ``get`` reply)."""

    created_at: str | None
    updated_at: str | None


class StateSnapshot(Snapshot):
    """The retained state of a workflow, made from its latest event."""

    updated_at: str | None
    seq: int | None


def state_snapshot(event: dict[str, Any]) -> StateSnapshot:
    """The retained state snapshot derived from one event."""
    return {
        "workflow_id": event.get("workflow_id"),  # type: ignore[typeddict-item]
        "workflow_type": event.get("workflow_type"),  # type: ignore[typeddict-item]
        "status": event.get("status"),  # type: ignore[typeddict-item]
        "current_step": event.get("step"),
        "error": event.get("error"),
        "updated_at": event.get("at"),
        "seq": event.get("seq"),
    }


class ErrorBody(TypedDict):
    code: str
    message: str


class ErrorReply(TypedDict):
    """The reply to a refused command; ``error.code`` names the problem, ``error.message`` says
    what is wrong and what to do in one sentence."""

    request_id: str | None
    ok: Literal[False]
    error: ErrorBody


def error_reply(request_id: str | None, code: str, message: str) -> dict[str, Any]:
    """The reply to a refused command (MQTT, the control socket or the CLI without an agent)."""
    reply: ErrorReply = {
        "request_id": request_id,
        "ok": False,
        "error": {"code": code, "message": message},
    }
    return dict(reply)


def ok_reply(request_id: str | None, **fields: Any) -> dict[str, Any]:
    """The reply to a command carried out: ``request_id``, ``ok: true`` and the command's fields."""
    return {"request_id": request_id, "ok": True, **fields}
