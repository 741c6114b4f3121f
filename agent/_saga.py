"""The saga state machine: plain functions over plain data, no I/O, no asyncio.

The runner asks :func:`next_action` what to do, executes it, and feeds the outcome back through
:func:`begin`, :func:`succeeded`, :func:`failed`, :func:`cancel_inflight` or :func:`interrupted`;
operators act through :func:`cancel` and :func:`retry`, guarded by :func:`can_cancel` and
:func:`can_retry`; an exception that escaped the runner ends in :func:`internal_error`.

Every transition returns a :class:`Change`: the new :class:`Progress` and what goes into the same
commit with it — the events in the order they are written (a status change last, as
``status_changed``) and an alert when a person has to act. The runner decides none of that: it
runs the step, writes what the change says, and commits before the next side effect starts.

A position is a step *name*, not an index, so routes and branches can come later without a
migration of stored progress.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import zip_longest
from types import MappingProxyType
from typing import Any, Literal, NamedTuple

from agent._status import WorkflowStatus

Phase = Literal["forward", "compensate"]

_NO_COUNTS: Mapping[str, int] = MappingProxyType({})  # the shared, read-only empty counter

EventName = Literal[
    "workflow_started",
    "step_started",
    "step_completed",
    "step_failed",
    "compensation_started",
    "compensation_completed",
    "compensation_failed",
    "status_changed",
]
AlertKind = Literal["compensation_failed", "internal_error"]

#: The error recorded for an attempt cut short by the agent dying.
INTERRUPTED = "interrupted: the agent stopped while this attempt ran"
#: What the operator commands admit, in the words of their refusals.
CANCEL_RULE = "only ACTIVE or PAUSED workflows can be cancelled"
RETRY_RULE = "only FAILED and COMPENSATION_FAILED workflows can be retried"

_CANCELLABLE = frozenset({WorkflowStatus.ACTIVE, WorkflowStatus.PAUSED})
_RETRYABLE = frozenset({WorkflowStatus.FAILED, WorkflowStatus.COMPENSATION_FAILED})
_PREFIX: Mapping[Phase, str] = {"forward": "f:", "compensate": "c:"}  # of the counters' keys
_STARTED: Mapping[Phase, EventName] = {
    "forward": "step_started",
    "compensate": "compensation_started",
}
_COMPLETED: Mapping[Phase, EventName] = {
    "forward": "step_completed",
    "compensate": "compensation_completed",
}
_FAILED: Mapping[Phase, EventName] = {"forward": "step_failed", "compensate": "compensation_failed"}


class StepPlan(NamedTuple):
    """What the state machine needs to know about a step."""

    name: str
    compensable: bool = False
    max_attempts: int = 1
    compensate_max_attempts: int = 3
    max_interrupts: int = 3
    automate_next: bool = False
    retry_delays: tuple[float, ...] = ()  # delay after the n-th failure (last one repeats)
    compensate_retry_delays: tuple[float, ...] = ()


class Plan:
    """The ordered steps of a workflow."""

    __slots__ = ("_after", "_by_name", "steps")

    def __init__(self, steps: tuple[StepPlan, ...]) -> None:
        names = [s.name for s in steps]
        if len(set(names)) != len(names):
            raise ValueError("Step names must be unique within a plan.")
        if not names:
            raise ValueError("A plan needs at least one step.")
        self.steps = steps
        self._by_name = {s.name: s for s in steps}
        self._after: dict[str, str | None] = dict(zip_longest(names, names[1:]))

    def __repr__(self) -> str:
        return f"Plan(steps={self.steps!r})"

    def __eq__(self, other: object) -> bool:
        return self.steps == other.steps if isinstance(other, Plan) else NotImplemented

    def __hash__(self) -> int:
        return hash(self.steps)

    def get(self, name: str) -> StepPlan:
        return self._by_name[name]

    @property
    def first(self) -> str:
        return self.steps[0].name

    def after(self, name: str) -> str | None:
        return self._after[name]


class Inflight(NamedTuple):
    """The attempt whose "started" record is committed but whose outcome is not."""

    step: str
    phase: Phase
    seq: int
    attempt: int


class Progress(NamedTuple):
    """Where a workflow instance stands; stored as JSON beside its state.

    The records of the state machine are named tuples: immutable, cheap to copy with
    ``_replace`` (several times a step), and cheap to define (a frozen dataclass compiles its
    methods at every start of the agent).
    """

    status: WorkflowStatus = WorkflowStatus.ACTIVE
    saga: bool = False
    next_step: str | None = None
    completed: tuple[str, ...] = ()
    to_compensate: tuple[str, ...] = ()
    compensated: tuple[str, ...] = ()
    compensation_failed: tuple[str, ...] = ()
    failed_step: str | None = None
    error: str | None = None
    cancelled: bool = False
    failures: Mapping[str, int] = _NO_COUNTS
    interrupts: Mapping[str, int] = _NO_COUNTS
    executions: Mapping[str, int] = _NO_COUNTS
    inflight: Inflight | None = None
    journal_seq: int = 0
    not_before: float | None = None

    # -- serialisation ---------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The fields that differ from their defaults (``status`` always): compact, because it is
        rewritten with every commit. (Spelled out field by field: it runs for every commit.)"""
        out: dict[str, Any] = {"status": self.status.value}
        if self.saga:
            out["saga"] = True
        if self.next_step is not None:
            out["next_step"] = self.next_step
        if self.completed:
            out["completed"] = list(self.completed)
        if self.to_compensate:
            out["to_compensate"] = list(self.to_compensate)
        if self.compensated:
            out["compensated"] = list(self.compensated)
        if self.compensation_failed:
            out["compensation_failed"] = list(self.compensation_failed)
        if self.failed_step is not None:
            out["failed_step"] = self.failed_step
        if self.error is not None:
            out["error"] = self.error
        if self.cancelled:
            out["cancelled"] = True
        if self.failures:
            out["failures"] = dict(self.failures)
        if self.interrupts:
            out["interrupts"] = dict(self.interrupts)
        if self.executions:
            out["executions"] = dict(self.executions)
        fl = self.inflight
        if fl is not None:
            out["inflight"] = {
                "step": fl.step,
                "phase": fl.phase,
                "seq": fl.seq,
                "attempt": fl.attempt,
            }
        if self.journal_seq:
            out["journal_seq"] = self.journal_seq
        if self.not_before is not None:
            out["not_before"] = self.not_before
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Progress:
        d = dict(data)
        d["status"] = WorkflowStatus(d["status"])
        for key in ("completed", "to_compensate", "compensated", "compensation_failed"):
            d[key] = tuple(d.get(key, ()))
        if d.get("inflight"):
            d["inflight"] = Inflight(**d["inflight"])
        return cls(**{k: v for k, v in d.items() if k in cls._fields})

    @property
    def current_step(self) -> str | None:
        """The step that runs (or runs next, or is being compensated)."""
        if self.inflight is not None:
            return self.inflight.step
        if self.status is WorkflowStatus.COMPENSATING and self.to_compensate:
            return self.to_compensate[0]
        if self.status is WorkflowStatus.ACTIVE:
            return self.next_step
        return self.failed_step


_replace = Progress._replace


def _key(phase: Phase, step: str) -> str:
    return _PREFIX[phase] + step


def _bump(counts: Mapping[str, int], key: str, by: int = 1) -> dict[str, int]:
    out = dict(counts)
    out[key] = out.get(key, 0) + by
    return out


def _drop(counts: Mapping[str, int], key: str) -> dict[str, int]:
    return {k: v for k, v in counts.items() if k != key}


def _delay(delays: tuple[float, ...], failures: int) -> float:
    if not delays:
        return 0.0
    return delays[min(failures, len(delays)) - 1]


# ------------------------------------------------------------------------------------------------
# Queries


class Run(NamedTuple):
    """Run ``step`` in ``phase``; ``not_before`` is an epoch time to wait for (retry backoff)."""

    step: str
    phase: Phase
    not_before: float | None = None


class Stop(NamedTuple):
    """Nothing to run: the workflow is finished, failed, or waits for someone."""

    status: WorkflowStatus


def next_action(progress: Progress) -> Run | Stop:
    """What the runner should do next."""
    if progress.inflight is not None:
        raise ValueError(
            "An attempt is in flight; record its outcome (or mark it interrupted) first."
        )
    if progress.status is WorkflowStatus.ACTIVE and progress.next_step is not None:
        return Run(progress.next_step, "forward", progress.not_before)
    if progress.status is WorkflowStatus.COMPENSATING and progress.to_compensate:
        return Run(progress.to_compensate[0], "compensate", progress.not_before)
    return Stop(progress.status)


# ------------------------------------------------------------------------------------------------
# What a transition writes, and which operator commands a status admits


class Event(NamedTuple):
    """An event to write with the transition; its ``status`` is that of the new progress."""

    name: EventName
    step: str | None = None
    attempt: int | None = None
    error: str | None = None


class Alert(NamedTuple):
    """Something a person has to act on, written with the transition."""

    kind: AlertKind
    step: str | None
    error: str | None


class Change(NamedTuple):
    """What a transition decided: the new progress and what commits with it."""

    progress: Progress
    events: tuple[Event, ...] = ()  # in order; a status change ends them with "status_changed"
    alert: Alert | None = None
    status_changed: bool = False


def _change(
    before: Progress, after: Progress, *events: Event, alert: Alert | None = None
) -> Change:
    if after.status is before.status:
        return Change(after, events, alert)
    changed = Event("status_changed", after.current_step, None, after.error)
    return Change(after, (*events, changed), alert, True)


def can_cancel(status: WorkflowStatus) -> bool:
    """May an operator cancel a workflow in ``status``?"""
    return status in _CANCELLABLE


def can_retry(status: WorkflowStatus) -> bool:
    """May an operator retry a workflow in ``status``?"""
    return status in _RETRYABLE


# ------------------------------------------------------------------------------------------------
# Transitions


def start(plan: Plan, *, saga: bool) -> Change:
    """A new instance, due to run the first step."""
    first = plan.first
    progress = Progress(saga=saga, next_step=first)  # ACTIVE
    return Change(progress, (Event("workflow_started", first),))


def begin(progress: Progress, step: str, phase: Phase) -> Change:
    """An attempt of ``step`` is about to run; its "started" record commits with this change."""
    action = next_action(progress)
    if not isinstance(action, Run) or action.step != step or action.phase != phase:
        raise ValueError(f"{phase} step {step!r} is not what runs next ({action}).")
    key = _key(phase, step)
    executions = _bump(progress.executions, key)
    seq = progress.journal_seq + 1
    attempt = executions[key]
    after = _replace(
        progress,
        executions=executions,
        journal_seq=seq,
        inflight=Inflight(step=step, phase=phase, seq=seq, attempt=attempt),
        not_before=None,
    )
    return Change(after, (Event(_STARTED[phase], step, attempt),))


def _require_inflight(progress: Progress) -> Inflight:
    if progress.inflight is None:
        raise ValueError("No attempt is in flight.")
    return progress.inflight


def succeeded(plan: Plan, progress: Progress) -> Change:
    """The in-flight attempt completed."""
    fl = _require_inflight(progress)
    done = Event(_COMPLETED[fl.phase], fl.step, fl.attempt)
    key = _key(fl.phase, fl.step)
    # A completed attempt never runs again, so its counters go (the progress is rewritten with
    # every commit): failures, interrupts and executions, which only number the next attempt.
    failures, interrupts, executions = (
        _drop(counts, key)
        for counts in (progress.failures, progress.interrupts, progress.executions)
    )
    if fl.phase == "forward" and not progress.cancelled:  # the common case, in one copy
        nxt = plan.after(fl.step)
        finished = nxt is None
        after = progress._replace(
            inflight=None,
            completed=(*progress.completed, fl.step),
            next_step=nxt,
            status=WorkflowStatus.COMPLETED if finished else progress.status,
            error=None if finished else progress.error,
            failures=failures,
            interrupts=interrupts,
            executions=executions,
        )
        return _change(progress, after, done)
    base = progress._replace(
        inflight=None, failures=failures, interrupts=interrupts, executions=executions
    )
    if fl.phase == "forward":
        # A cancel arrived while the step ran: it completed, so (saga mode) it joins the rollback.
        base = _replace(base, completed=(*base.completed, fl.step))
        if not progress.saga:
            after = _replace(base, next_step=None, status=WorkflowStatus.CANCELLED)
        else:
            after = _begin_rollback(plan, base, None)
        return _change(progress, after, done)
    after = _compensation_finished(
        _replace(
            base, to_compensate=base.to_compensate[1:], compensated=(*base.compensated, fl.step)
        )
    )
    return _change(progress, after, done)


def failed(plan: Plan, progress: Progress, error: str, *, now: float = 0.0) -> Change:
    """The in-flight attempt raised (or timed out, or returned a bad result).

    Retries per the step's policy (``not_before`` carries the backoff); once they are used up a
    forward failure starts the rollback (saga) or ends in FAILED, and a compensation failure is
    recorded, alerted, and the rollback goes on with the others.
    """
    fl = _require_inflight(progress)
    event = Event(_FAILED[fl.phase], fl.step, fl.attempt, error)
    key = _key(fl.phase, fl.step)
    failures = _bump(progress.failures, key)
    spec = plan.get(fl.step)
    limit = spec.max_attempts if fl.phase == "forward" else spec.compensate_max_attempts
    delays = spec.retry_delays if fl.phase == "forward" else spec.compensate_retry_delays
    base = _replace(progress, inflight=None, failures=failures, error=error)
    # A cancel stops forward retries; compensations keep theirs (the rollback must finish).
    if failures[key] < limit and not (progress.cancelled and fl.phase == "forward"):
        wait = _delay(delays, failures[key])
        return _change(
            progress, _replace(base, not_before=(now + wait) if wait > 0 else None), event
        )
    return _give_up(plan, progress, base, fl, event, None)


def interrupted(plan: Plan, progress: Progress) -> Change:
    """The in-flight attempt was cut short by the agent dying (found on recovery).

    It does not count against ``retry``; it runs again until it has been interrupted
    ``max_interrupts`` times, and then counts as failed — as an interrupted step, whose own
    compensation runs first because it may have taken effect.
    """
    fl = _require_inflight(progress)
    event = Event(_FAILED[fl.phase], fl.step, fl.attempt, INTERRUPTED)
    key = _key(fl.phase, fl.step)
    interrupts = _bump(progress.interrupts, key)
    base = _replace(progress, inflight=None, interrupts=interrupts)
    if interrupts[key] < plan.get(fl.step).max_interrupts:
        return _change(progress, base, event)
    msg = (
        f"{'Compensation of ' if fl.phase == 'compensate' else ''}step {fl.step!r} was interrupted "
        f"{interrupts[key]} times (max_interrupts); it is not run again."
    )
    # It may have taken effect: in a rollback its own compensation runs first.
    return _give_up(plan, progress, _replace(base, error=msg), fl, event, fl.step)


def _give_up(
    plan: Plan,
    before: Progress,
    progress: Progress,
    fl: Inflight,
    event: Event,
    also_first: str | None,
) -> Change:
    """The attempt's step is not run again: ``progress.error`` says why. A rollback compensates
    ``also_first`` (when compensable) before the completed steps."""
    error = progress.error
    if fl.phase == "compensate":
        after = _compensation_finished(
            _replace(
                progress,
                to_compensate=progress.to_compensate[1:],
                compensation_failed=(*progress.compensation_failed, fl.step),
                failures=_drop(progress.failures, _key("compensate", fl.step)),
            )
        )
        # A person has to undo the step by hand; the rollback goes on with the others.
        return _change(before, after, event, alert=Alert("compensation_failed", fl.step, error))
    progress = _replace(progress, failed_step=fl.step)
    if not progress.saga:
        status = WorkflowStatus.CANCELLED if progress.cancelled else WorkflowStatus.FAILED
        return _change(before, _replace(progress, status=status), event)
    return _change(before, _begin_rollback(plan, progress, also_first), event)


def _begin_rollback(plan: Plan, progress: Progress, also_first: str | None) -> Progress:
    """Queue compensations of the completed steps, newest first (plus an interrupted step's own)."""
    queue = [s for s in reversed(progress.completed) if plan.get(s).compensable]
    if also_first is not None and plan.get(also_first).compensable and also_first not in queue:
        queue.insert(0, also_first)
    return _compensation_finished(
        _replace(progress, next_step=None, to_compensate=tuple(queue), not_before=None)
    )


def _compensation_finished(progress: Progress) -> Progress:
    """COMPENSATING while compensations are due, else the rollback's end status. (No backoff is
    pending here: an attempt was just recorded, or the rollback just began.)"""
    if progress.to_compensate:
        return _replace(progress, status=WorkflowStatus.COMPENSATING)
    if progress.compensation_failed:
        status = WorkflowStatus.COMPENSATION_FAILED
    elif progress.cancelled:
        status = WorkflowStatus.CANCELLED
    else:
        status = WorkflowStatus.FAILED_ROLLED_BACK
    return _replace(progress, status=status)


def cancel(plan: Plan, progress: Progress, *, reason: str = "cancelled on request") -> Change:
    """An operator asked to cancel.

    With an attempt in flight only the flag is set: the runner stops the attempt and records it
    (see :func:`cancel_inflight`). Otherwise saga mode compensates the completed steps first and
    ends in CANCELLED; without saga mode the workflow ends in CANCELLED at once.
    """
    if not can_cancel(progress.status):
        raise ValueError(f"A {progress.status.value} workflow cannot be cancelled: {CANCEL_RULE}.")
    marked = _replace(progress, cancelled=True, error=reason)
    if progress.inflight is not None:
        after = marked
    elif not progress.saga:
        after = _replace(marked, status=WorkflowStatus.CANCELLED, next_step=None)
    else:
        after = _begin_rollback(plan, marked, None)
    return _change(progress, after)


def cancel_inflight(plan: Plan, progress: Progress, error: str) -> Change:
    """The in-flight forward attempt was stopped because of a cancel; it may have taken effect, so
    in saga mode its own compensation runs first."""
    fl = _require_inflight(progress)
    event = Event(_FAILED[fl.phase], fl.step, fl.attempt, error)
    if fl.phase == "compensate":  # cancel never stops a compensation: it runs again
        return _change(progress, _replace(progress, inflight=None), event)
    base = _replace(progress, inflight=None, error=error, failed_step=fl.step, cancelled=True)
    if not base.saga:
        after = _replace(base, status=WorkflowStatus.CANCELLED, next_step=None)
    else:
        after = _begin_rollback(plan, base, fl.step)
    return _change(progress, after, event)


def internal_error(progress: Progress, error: str) -> Change:
    """Something other than a step failed (an exception escaped the runner): stop, from the
    committed ``progress``, in a status ``retry`` acts on, and alert.

    Forward: ``FAILED`` at the step in flight or due next, which ``retry`` runs again (it may
    have taken effect, as after a crash; ``idempotency_key`` makes that safe). Rollback:
    ``COMPENSATION_FAILED`` with every compensation still due, which ``retry`` runs in order.
    Nothing is compensated here. A workflow that is not running is left as it is.
    """
    fl = progress.inflight
    # Its "started" record is committed; its outcome never will be.
    events = () if fl is None else (Event(_FAILED[fl.phase], fl.step, fl.attempt, error),)
    after = _replace(progress, inflight=None, not_before=None)
    if progress.status is WorkflowStatus.ACTIVE:  # next_step is also the step in flight, if any
        after = _replace(
            after, status=WorkflowStatus.FAILED, failed_step=progress.next_step, error=error
        )
    elif progress.status is WorkflowStatus.COMPENSATING:
        after = _replace(
            after,
            status=WorkflowStatus.COMPENSATION_FAILED,
            to_compensate=(),
            compensation_failed=(*progress.compensation_failed, *progress.to_compensate),
            error=error,
        )
    alert = Alert("internal_error", after.current_step, error)
    return _change(progress, after, *events, alert=alert)


def retry(plan: Plan, progress: Progress) -> Change:
    """An operator asked to retry a FAILED workflow (from its failed step) or a
    COMPENSATION_FAILED one (its failed compensations, in the order they were due)."""
    if progress.status is WorkflowStatus.FAILED and progress.failed_step is not None:
        after = _replace(
            progress,
            status=WorkflowStatus.ACTIVE,
            next_step=progress.failed_step,
            failed_step=None,
            error=None,
            failures=_drop(progress.failures, _key("forward", progress.failed_step)),
            interrupts=_drop(progress.interrupts, _key("forward", progress.failed_step)),
            not_before=None,
        )
    elif progress.status is WorkflowStatus.COMPENSATION_FAILED:
        keys = {_key("compensate", s) for s in progress.compensation_failed}
        after = _replace(
            progress,
            status=WorkflowStatus.COMPENSATING,
            to_compensate=progress.compensation_failed,
            compensation_failed=(),
            failures={k: v for k, v in progress.failures.items() if k not in keys},
            interrupts={k: v for k, v in progress.interrupts.items() if k not in keys},
            not_before=None,
        )
    else:
        raise ValueError(f"A {progress.status.value} workflow cannot be retried: {RETRY_RULE}.")
    return _change(progress, after)


def continues(plan: Plan, before: Progress, after: Progress) -> bool:
    """After a completed forward step, does ``next_step()`` go straight on (``automate_next``)?"""
    fl = before.inflight
    return (
        fl is not None
        and fl.phase == "forward"
        and after.status is WorkflowStatus.ACTIVE
        and after.next_step is not None
        and plan.get(fl.step).automate_next
    )
