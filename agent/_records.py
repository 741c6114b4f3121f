"""What the store reads and writes: the record and transition shapes, and how times and events are
written (ISO 8601 times, compact JSON, workflow events stored without what their row implies)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

from agent._messages import Summary, snapshot
from agent._messages import dumps as dumps  # the one encoder, for what the store writes
from agent._status import WorkflowStatus

_iso_second: tuple[int, str] = (-1, "")
_iso_last: tuple[float, str] = (-1.0, "")  # the events of one transition share their time


def iso(ts: float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC with milliseconds (``2026-11-26T22:55:10.382Z``), as
    ``datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")`` gives them; the date
    and time of the current second are formatted once (this runs for every event)."""
    global _iso_second, _iso_last
    if ts is None:
        return None
    if ts == _iso_last[0]:
        return _iso_last[1]
    frac, whole = math.modf(ts)  # the rounding datetime.fromtimestamp does
    second, micros = int(whole), round(frac * 1_000_000)
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    elif micros < 0:
        second, micros = second - 1, micros + 1_000_000
    if _iso_second[0] != second:
        _iso_second = (second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    text = f"{_iso_second[1]}.{micros // 1000:03d}Z"
    _iso_last = (ts, text)
    return text


class InstanceRecord(NamedTuple):
    """One workflow instance as stored."""

    id: str
    workflow_type: str
    definition_hash: str
    status: WorkflowStatus
    current_step: str | None
    error: str | None
    state: dict[str, Any]
    progress: dict[str, Any]
    created_at: float
    updated_at: float
    definition: str | None = None  # the snapshot JSON, when asked for

    def summary(self) -> Summary:
        return {
            **snapshot(
                self.id, self.workflow_type, self.status.value, self.current_step, self.error
            ),
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
        }


class JournalEntry(NamedTuple):
    """One attempt of a step or a compensation."""

    workflow_id: str
    seq: int
    step: str
    phase: str
    attempt: int
    outcome: str  # started | completed | failed | interrupted | cancelled
    started_at: float
    ended_at: float | None
    error: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "step": self.step,
            "phase": self.phase,
            "attempt": self.attempt,
            "outcome": self.outcome,
            "started_at": iso(self.started_at),
            "ended_at": iso(self.ended_at),
            "error": self.error,
        }


class OutboxItem(NamedTuple):
    """An event or alert waiting to be published; ``payload["seq"] == seq``."""

    seq: int
    kind: str  # "event" | "alert"
    workflow_id: str | None
    payload: dict[str, Any]


class JournalStart(NamedTuple):
    seq: int
    step: str
    phase: str
    attempt: int
    at: float


class JournalEnd(NamedTuple):
    seq: int
    outcome: str
    at: float
    error: str | None = None
    outputs: str | None = None  # JSON: the output values the step commanded, by device


class Transition(NamedTuple):
    """Everything one state transition writes, committed atomically."""

    workflow_id: str
    status: WorkflowStatus
    current_step: str | None
    error: str | None
    state_json: str
    progress_json: str
    at: float
    journal: Sequence[JournalStart | JournalEnd] = ()
    events: Sequence[tuple[str, dict[str, Any]]] = ()  # (kind, payload)


class NewInstance(NamedTuple):
    id: str
    workflow_type: str
    workflow_version: str
    definition_hash: str
    definition: str
    first: Transition
    request: tuple[str, dict[str, Any]] | None = None
    #: ``(schedule name, slot key)`` when a schedule's fire creates it: recorded in the same
    #: transaction, and nothing is created when that schedule already fired at or after the slot.
    fire: tuple[str, str] | None = None


#: What a stored workflow event leaves out: its columns (seq, workflow_id), its instance row
#: (workflow_type) and null fields. Every event of every step is written to an SD card, so it is
#: stored compact and made whole again when it is read for publishing.
_IMPLIED = frozenset(("seq", "workflow_id", "workflow_type"))
_EVENT_TEMPLATE: dict[str, Any] = dict.fromkeys(
    ("seq", "at", "workflow_id", "workflow_type", "event", "step", "attempt", "status", "error")
)


def stored_event(kind: str, payload: dict[str, Any]) -> str:
    if kind != "event":
        return dumps(payload)
    return dumps({k: v for k, v in payload.items() if v is not None and k not in _IMPLIED})


def whole_event(
    seq: int, kind: str, workflow_id: str | None, text: str, workflow_type: str | None
) -> dict[str, Any]:
    payload: dict[str, Any] = json.loads(text)
    if kind != "event":
        return payload
    whole = dict(_EVENT_TEMPLATE)
    whole["workflow_id"] = workflow_id
    whole["workflow_type"] = workflow_type
    whole.update(payload)
    whole["seq"] = seq
    return whole
