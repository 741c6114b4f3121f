"""The saga state machine: plain functions over plain data, no I/O, no asyncio.

The runner asks :func:`next_action` what to do, executes it, and feeds the outcome back through
:func:`begin`, :func:`succeeded`, :func:`failed`, :func:`cancel_inflight` or :func:`interrupted`;
operators act through :func:`cancel` and :func:`retry`, guarded by :func:`can_cancel` and
:func:`can_retry`; an exception that escaped the runner ends in :func:`internal_error`.

Every transition returns a :class:`Change`: the new :class:`Progress` and what goes into the same
commit with it — the events in the order they are written (a status change last, as
``status_changed``) and an alert when a person has to act. The runner decides none of that: it
runs the step, writes what the change says, and commits before the next side effect starts.

A position is a step *name*, not an index. The plan is a graph: :meth:`Plan.after` follows
``next`` (or the list order), a DECISION's successor is the route its function chose
(:func:`decided`), a HUMAN_INPUT pauses (:func:`pause`, :func:`resume`, :func:`pause_timed_out`) and
a PARALLEL runs its branches' steps side by side (:func:`branch_actions`, :func:`branch_begin`,
:func:`branch_succeeded`, :func:`branch_failed`, :func:`branch_cancelled`,
:func:`branch_interrupted`; a branch's DELAY: :func:`branch_delay_armed`,
:func:`branch_timer_rebased`, :func:`branch_delay_finished`). ``completed`` is the path actually taken, in completion order (branch
steps included), and a rollback undoes exactly its compensable steps, newest first.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import zip_longest
from types import MappingProxyType
from typing import Any, Literal, NamedTuple

from agent._clock import ClockReading, Stamp, TimerMark, arm
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
    "workflow_paused",
    "status_changed",
]
AlertKind = Literal["compensation_failed", "internal_error", "failed_after_pivot"]
StepKind = Literal["STANDARD", "DECISION", "HUMAN_INPUT", "PARALLEL", "DELAY"]
#: A ``next``/route target that ends the workflow.
END = "END"

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
    kind: StepKind = "STANDARD"
    next: str | None = None  # None: the next in the list; END: the workflow ends
    routes: tuple[tuple[str, str], ...] = ()  # DECISION: (route key, target or END)
    default: str | None = None  # DECISION: the target of None or an unknown key
    branches: tuple[tuple[str, ...], ...] = ()  # PARALLEL: the names of each branch's steps
    pivot: bool = False
    on_timeout: Literal["fail", "continue"] = "fail"  # HUMAN_INPUT
    on_late: Literal["run", "fail"] = "run"  # DELAY: its deadline passed while the agent was down
    max_lateness: float | None = None  # seconds after the step before it finished, at most


class Plan:
    """The steps of a workflow: ``steps`` the outer path in list order, ``inner`` the steps of
    PARALLEL branches (named in their PARALLEL's ``branches``)."""

    __slots__ = ("_after", "_by_name", "branch_of", "inner", "pivot", "special", "stamps", "steps")

    def __init__(self, steps: tuple[StepPlan, ...], inner: tuple[StepPlan, ...] = ()) -> None:
        names = [s.name for s in steps]
        every = [*names, *(s.name for s in inner)]
        if len(set(every)) != len(every):
            raise ValueError("Step names must be unique within a plan.")
        if not names:
            raise ValueError("A plan needs at least one step.")
        self.steps = steps
        self.inner = inner
        self._by_name = {s.name: s for s in (*steps, *inner)}
        self._after: dict[str, str | None] = dict(zip_longest(names, names[1:]))
        #: The steps that do not simply run: name -> kind (empty for a STANDARD-only plan).
        self.special: dict[str, StepKind] = {}
        #: A branch step's PARALLEL and branch index.
        self.branch_of: dict[str, tuple[str, int]] = {}
        self.pivot: str | None = None
        #: Whether completions are stamped (``Progress.done_at``): a step has ``max_lateness``.
        self.stamps = any(s.max_lateness is not None for s in steps)
        for s in steps:
            if s.next is not None:
                self._after[s.name] = None if s.next == END else s.next
            if s.kind != "STANDARD":
                self.special[s.name] = s.kind
            if s.pivot:
                self.pivot = s.name
            for b, branch in enumerate(s.branches):
                for name, nxt in zip_longest(branch, branch[1:]):
                    self._after[name] = nxt
                    self.branch_of[name] = (s.name, b)

    def __repr__(self) -> str:
        inner = f", inner={self.inner!r}" if self.inner else ""
        return f"Plan(steps={self.steps!r}{inner})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Plan):
            return NotImplemented
        return self.steps == other.steps and self.inner == other.inner

    def __hash__(self) -> int:
        return hash((self.steps, self.inner)) if self.inner else hash(self.steps)

    def route(self, name: str, key: str | None) -> tuple[bool, str | None]:
        """A DECISION's successor for route ``key``: ``(known, target)``, target None for END;
        ``known`` is False when neither the key nor a default gives one."""
        spec = self._by_name[name]
        target = dict(spec.routes).get(key) if key is not None else None
        if target is None:
            target = spec.default
        if target is None:
            return False, None
        return True, None if target == END else target

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
    routes: Mapping[str, str] = MappingProxyType({})  # DECISION step -> the route key it chose
    running: tuple[Inflight, ...] = ()  # the PARALLEL's branch attempts in flight
    # branch step -> its durable timer: a branch DELAY's, or a branch step's retry back-off
    waits: Mapping[str, TimerMark] = MappingProxyType({})
    undo_first: tuple[str, ...] = ()  # branch steps cut short: their own compensation runs first
    timer: TimerMark | None = None  # the durable timer of the DELAY step due (see delay_armed)
    done_at: Stamp | None = None  # when the last forward step completed (plans with stamps only)

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
        if self.routes:
            out["routes"] = dict(self.routes)
        if self.running:
            out["running"] = [list(fl) for fl in self.running]
        if self.waits:
            out["waits"] = {step: mark._asdict() for step, mark in self.waits.items()}
        if self.undo_first:
            out["undo_first"] = list(self.undo_first)
        if self.timer is not None:
            out["timer"] = self.timer._asdict()
        if self.done_at is not None:
            out["done_at"] = list(self.done_at)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Progress:
        d = dict(data)
        d["status"] = WorkflowStatus(d["status"])
        for key in ("completed", "to_compensate", "compensated", "compensation_failed"):
            d[key] = tuple(d.get(key, ()))
        if d.get("inflight"):
            d["inflight"] = Inflight(**d["inflight"])
        if "running" in d:
            d["running"] = tuple(Inflight(*fl) for fl in d["running"])
        if "undo_first" in d:
            d["undo_first"] = tuple(d["undo_first"])
        if d.get("timer") is not None:
            d["timer"] = TimerMark(**d["timer"])
        if d.get("waits"):
            d["waits"] = {step: _wait_mark(v) for step, v in d["waits"].items()}
        if d.get("done_at") is not None:
            d["done_at"] = Stamp(*d["done_at"])
        return cls(**{k: v for k, v in d.items() if k in cls._fields})

    @property
    def current_step(self) -> str | None:
        """The step that runs (or runs next, or is being compensated)."""
        if self.inflight is not None:
            return self.inflight.step
        if self.status is WorkflowStatus.COMPENSATING and self.to_compensate:
            return self.to_compensate[0]
        if self.status is WorkflowStatus.ACTIVE or self.status is WorkflowStatus.PAUSED:
            return self.next_step
        return self.failed_step


_replace = Progress._replace
_NO_WAITS: Mapping[str, TimerMark] = MappingProxyType({})


def _wait_mark(value: Any) -> TimerMark:
    """A stored branch wait: a timer mark, or (stored before branch waits were durable timers)
    a retry back-off's wall-clock time, which keeps its wall-clock rule: the mark counts as
    armed on a synchronized clock in an unknown boot, so it is rebased and the wall deadline
    rules while the clock is synchronized (without the sync nothing is left of it to wait for)."""
    if isinstance(value, Mapping):
        return TimerMark(**value)
    wall = float(value)
    return TimerMark(
        wall_deadline=wall,
        synchronized=True,
        boot_id="",
        boottime_deadline=0.0,
        remaining=0.0,
        since=0.0,
        rebooted=True,
    )


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


class Pause(NamedTuple):
    """The HUMAN_INPUT ``step`` is due: commit :func:`pause` and wait for :func:`resume`."""

    step: str


class Fork(NamedTuple):
    """The PARALLEL ``step`` is due (or running): its branch steps run as
    :func:`branch_actions` says."""

    step: str


class Delay(NamedTuple):
    """The DELAY ``step`` is due: arm its timer (:func:`delay_armed`) if ``progress.timer`` is
    None, else wait for it and then :func:`delay_finished`."""

    step: str


def next_action(progress: Progress, plan: Plan | None = None) -> Run | Stop | Pause | Fork | Delay:
    """What the runner should do next (without ``plan``, every step is one that runs)."""
    if progress.inflight is not None:
        raise ValueError(
            "An attempt is in flight; record its outcome (or mark it interrupted) first."
        )
    if progress.status is WorkflowStatus.ACTIVE and progress.next_step is not None:
        step = progress.next_step
        if plan is not None and step in plan.special:
            kind = plan.special[step]
            if kind == "HUMAN_INPUT":
                return Pause(step)
            if kind == "PARALLEL":
                return Fork(step)
            if kind == "DELAY":
                return Delay(step)
        return Run(step, "forward", progress.not_before)
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
        timer=None,
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


def failed(
    plan: Plan,
    progress: Progress,
    error: str,
    *,
    now: float = 0.0,
    clock: ClockReading | None = None,
) -> Change:
    """The in-flight attempt raised (or timed out, or returned a bad result).

    Retries per the step's policy (``not_before`` carries the backoff, and with ``clock`` also a
    durable timer in ``timer``, so a restart never retries early); once they are used up a
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
        if wait <= 0:
            return _change(progress, _replace(base, not_before=None), event)
        mark = None if clock is None else arm(clock, wait)
        return _change(progress, _replace(base, not_before=now + wait, timer=mark), event)
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
    return _forward_gave_up(
        plan, before, _replace(progress, failed_step=fl.step), event, also_first
    )


def _forward_gave_up(
    plan: Plan,
    before: Progress,
    progress: Progress,
    event: Event | None,
    also_first: str | None,
    *,
    failed: str | None = None,
) -> Change:
    """A forward step failed for good (``progress.failed_step`` is where ``retry`` resumes;
    ``failed`` the step that failed, when that is a branch step of it): FAILED without saga mode
    or after the pivot completed (with an alert), else the rollback."""
    events = () if event is None else (event,)
    past_pivot = _past_pivot(plan, progress)
    if past_pivot and not progress.cancelled:
        alert = Alert("failed_after_pivot", failed or progress.failed_step, progress.error)
        failed_now = _replace(progress, status=WorkflowStatus.FAILED, undo_first=())
        return _change(before, failed_now, *events, alert=alert)
    if not progress.saga or past_pivot:
        status = WorkflowStatus.CANCELLED if progress.cancelled else WorkflowStatus.FAILED
        return _change(before, _replace(progress, status=status, undo_first=()), *events)
    return _change(before, _begin_rollback(plan, progress, also_first), *events)


def _past_pivot(plan: Plan, progress: Progress) -> bool:
    return plan.pivot is not None and plan.pivot in progress.completed


def _begin_rollback(plan: Plan, progress: Progress, also_first: str | None) -> Progress:
    """Queue compensations of the completed steps, newest first (after the own compensations of
    an interrupted step and of branch steps cut short). Past the pivot nothing is undone."""
    if _past_pivot(plan, progress):
        status = WorkflowStatus.CANCELLED if progress.cancelled else WorkflowStatus.FAILED
        return _replace(progress, next_step=None, status=status, undo_first=())
    queue = [s for s in reversed(progress.completed) if plan.get(s).compensable]
    first = [*progress.undo_first, *(() if also_first is None else (also_first,))]
    for step in reversed(first):
        if plan.get(step).compensable and step not in queue:
            queue.insert(0, step)
    return _compensation_finished(
        _replace(
            progress, next_step=None, to_compensate=tuple(queue), not_before=None, undo_first=()
        )
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
    marked = _replace(progress, cancelled=True, error=reason, timer=None, waits=_NO_WAITS)
    if progress.inflight is not None or progress.running:
        after = marked  # the runner stops the attempts and records them
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
    flights = (*(() if progress.inflight is None else (progress.inflight,)), *progress.running)
    # Their "started" records are committed; their outcomes never will be.
    events = tuple(Event(_FAILED[fl.phase], fl.step, fl.attempt, error) for fl in flights)
    after = _replace(
        progress,
        inflight=None,
        not_before=None,
        running=(),
        undo_first=(),
        timer=None,
        waits=_NO_WAITS,
    )
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
        step = progress.failed_step
        # A PARALLEL resumes at each branch's position; its branch steps get their retries again.
        keys = {_key("forward", step)} | {
            _key("forward", s) for b in plan.get(step).branches for s in b
        }
        after = _replace(
            progress,
            status=WorkflowStatus.ACTIVE,
            next_step=step,
            failed_step=None,
            error=None,
            failures={k: v for k, v in progress.failures.items() if k not in keys},
            interrupts={k: v for k, v in progress.interrupts.items() if k not in keys},
            not_before=None,
            timer=None,
            waits=_NO_WAITS,
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


# ------------------------------------------------------------------------------------------------
# DECISION


def decided(plan: Plan, progress: Progress, key: str | None) -> Change:
    """The in-flight DECISION attempt returned route ``key`` (None: the default). The route is
    journaled in ``routes``; an unknown key without a default fails the step (saga rules), END
    completes the workflow."""
    fl = _require_inflight(progress)
    if fl.phase != "forward" or progress.cancelled:
        return succeeded(plan, progress)
    known, target = plan.route(fl.step, key)
    if not known:
        keys = ", ".join(k for k, _ in plan.get(fl.step).routes)
        error = (
            f"DECISION step {fl.step!r} returned the route {key!r}, which is none of its routes "
            f"({keys}) and it has no default"
        )
        return failed(plan, progress, error)
    fkey = _key("forward", fl.step)
    after = _replace(
        progress,
        inflight=None,
        completed=(*progress.completed, fl.step),
        next_step=target,
        status=WorkflowStatus.COMPLETED if target is None else progress.status,
        error=None if target is None else progress.error,
        failures=_drop(progress.failures, fkey),
        interrupts=_drop(progress.interrupts, fkey),
        executions=_drop(progress.executions, fkey),
        routes={**progress.routes, fl.step: "" if key is None else key},
    )
    return _change(progress, after, Event("step_completed", fl.step, fl.attempt))


# ------------------------------------------------------------------------------------------------
# HUMAN_INPUT


def pause(plan: Plan, progress: Progress, timer: TimerMark | None = None) -> Change:
    """The HUMAN_INPUT step is due: the workflow waits, PAUSED, for :func:`resume` (or, with
    ``timer``, its step's durable timeout, for :func:`pause_timed_out`)."""
    action = next_action(progress, plan)
    if not isinstance(action, Pause):
        raise ValueError(f"No HUMAN_INPUT step is due ({action}).")
    after = _replace(progress, status=WorkflowStatus.PAUSED, not_before=None, timer=timer)
    return _change(progress, after, Event("workflow_paused", action.step))


def _paused_step(progress: Progress) -> str:
    if progress.status is not WorkflowStatus.PAUSED or progress.next_step is None:
        raise ValueError(f"A {progress.status.value} workflow is not waiting for input.")
    return progress.next_step


def resume(plan: Plan, progress: Progress) -> Change:
    """Input came for the PAUSED workflow's step: the step completes and the workflow goes on."""
    step = _paused_step(progress)
    nxt = plan.after(step)
    after = _replace(
        progress,
        timer=None,
        status=WorkflowStatus.ACTIVE if nxt is not None else WorkflowStatus.COMPLETED,
        completed=(*progress.completed, step),
        next_step=nxt,
        error=None,
    )
    return _change(progress, after, Event("step_completed", step))


def pause_timed_out(
    plan: Plan, progress: Progress, on_timeout: str | None = None, *, error: str | None = None
) -> Change:
    """No input came within the step's timeout: ``continue`` resumes (the caller merges the input
    model's defaults), ``fail`` fails the step (saga rules; ``retry`` waits again)."""
    step = _paused_step(progress)
    rule = on_timeout or plan.get(step).on_timeout
    if rule == "continue":
        return resume(plan, progress)
    error = error or f"no input came for step {step!r} within its timeout"
    event = Event("step_failed", step, None, error)
    base = _replace(
        progress, status=WorkflowStatus.ACTIVE, failed_step=step, error=error, timer=None
    )
    return _forward_gave_up(plan, progress, base, event, None)


# ------------------------------------------------------------------------------------------------
# PARALLEL


def _halting(progress: Progress) -> bool:
    """A branch failed for good, or a cancel came: no branch step begins; the ones running end."""
    return progress.cancelled or progress.failed_step is not None


def branch_actions(plan: Plan, progress: Progress) -> tuple[Run | Delay, ...]:
    """The branch positions of the due PARALLEL (one per branch not running and not finished):
    a :class:`Run` for a step that can begin (once its retry back-off, ``progress.waits[step]``,
    is due: a durable timer, decided with the clock rules), a :class:`Delay` for a branch DELAY
    (arm its timer with :func:`branch_delay_armed` when ``progress.waits`` has none, then wait
    for it and :func:`branch_delay_finished`)."""
    step = progress.next_step
    if progress.status is not WorkflowStatus.ACTIVE or step is None or _halting(progress):
        return ()
    done = set(progress.completed)
    busy = {fl.step for fl in progress.running}
    out: list[Run | Delay] = []
    for branch in plan.get(step).branches:
        pos = next((s for s in branch if s not in done), None)
        if pos is not None and pos not in busy:
            out.append(Delay(pos) if plan.get(pos).kind == "DELAY" else Run(pos, "forward"))
    return tuple(out)


def branch_waiting(plan: Plan, progress: Progress) -> bool:
    """Whether the due PARALLEL only waits: no branch attempt runs and every unfinished branch
    stands at a DELAY or at a step whose retry back-off is pending. Nothing then holds a task
    for it; the timer service wakes it (as an outer DELAY)."""
    if progress.running or progress.inflight is not None:
        return False
    actions = branch_actions(plan, progress)
    return bool(actions) and all(isinstance(a, Delay) or a.step in progress.waits for a in actions)


def _branch_delay(plan: Plan, progress: Progress, step: str) -> None:
    if Delay(step) not in branch_actions(plan, progress):
        raise ValueError(f"Branch step {step!r} is not a DELAY that is due now.")


def branch_delay_armed(plan: Plan, progress: Progress, step: str, mark: TimerMark) -> Change:
    """The branch DELAY ``step`` begins: its timer ``mark`` commits with this change (the other
    branches go on)."""
    _branch_delay(plan, progress, step)
    if step in progress.waits:
        raise ValueError(f"The timer of DELAY step {step!r} is armed already.")
    after = _replace(progress, waits={**progress.waits, step: mark})
    return Change(after, (Event("step_started", step),))


def branch_timer_rebased(progress: Progress, step: str, mark: TimerMark) -> Change:
    """A branch's timer (a DELAY's, or a retry back-off) as this agent run first sees it
    (``_clock.rebase``)."""
    if step not in progress.waits:
        raise ValueError(f"No timer of branch step {step!r} is armed.")
    return Change(_replace(progress, waits={**progress.waits, step: mark}))


def branch_delay_finished(
    plan: Plan, progress: Progress, step: str, *, late_by: float | None = None
) -> Change:
    """The branch DELAY's timer is due (``late_by`` None) or was due ``late_by`` seconds before
    the agent saw it again (it was down): the step joins the path and its branch goes on,
    unless it is late and its ``on_late`` is ``fail``: then it fails and the PARALLEL halts
    (saga rules, as for a branch step whose retries are used up)."""
    _branch_delay(plan, progress, step)
    if step not in progress.waits:
        raise ValueError(f"The timer of DELAY step {step!r} is not armed.")
    base = _replace(progress, waits={k: v for k, v in progress.waits.items() if k != step})
    if late_by is not None and plan.get(step).on_late == "fail":
        error = (
            f"DELAY step {step!r} ended {late_by:.0f} s late, while the agent was down, and its "
            "on_late is fail; it did not go on"
        )
        base = _replace(base, failed_step=step, error=error)
        return _settle(plan, progress, base, Event("step_failed", step, None, error))
    base = _replace(base, completed=(*base.completed, step))
    return _settle(plan, progress, base, Event("step_completed", step))


def branch_begin(plan: Plan, progress: Progress, step: str) -> Change:
    """A branch step's attempt is about to run; its "started" record commits with this change
    (the runner waits for its back-off timer, if any, first)."""
    if Run(step, "forward") not in branch_actions(plan, progress):
        raise ValueError(f"Branch step {step!r} is not one that can begin now.")
    key = _key("forward", step)
    executions = _bump(progress.executions, key)
    seq = progress.journal_seq + 1
    fl = Inflight(step=step, phase="forward", seq=seq, attempt=executions[key])
    after = _replace(
        progress,
        executions=executions,
        journal_seq=seq,
        running=(*progress.running, fl),
        waits={k: v for k, v in progress.waits.items() if k != step},
    )
    return Change(after, (Event("step_started", step, fl.attempt),))


def _take(progress: Progress, step: str) -> tuple[Inflight, Progress]:
    for fl in progress.running:
        if fl.step == step:
            rest = tuple(r for r in progress.running if r.step != step)
            return fl, _replace(progress, running=rest)
    raise ValueError(f"Branch step {step!r} is not in flight.")


def branch_succeeded(plan: Plan, progress: Progress, step: str) -> Change:
    """A branch step's attempt completed: it joins the path (completion order)."""
    fl, base = _take(progress, step)
    key = _key("forward", step)
    base = _replace(
        base,
        completed=(*base.completed, step),
        failures=_drop(base.failures, key),
        interrupts=_drop(base.interrupts, key),
        executions=_drop(base.executions, key),
    )
    return _settle(plan, progress, base, Event("step_completed", step, fl.attempt))


def branch_failed(
    plan: Plan,
    progress: Progress,
    step: str,
    error: str,
    *,
    now: float = 0.0,
    clock: ClockReading | None = None,
) -> Change:
    """A branch step's attempt failed: retried per its policy, unless the PARALLEL is halting
    (a back-off is a durable timer in ``waits``, armed at ``clock``, so a restart never retries
    early; without ``clock`` it counts from ``now`` in an unknown boot); once its retries are
    used up the PARALLEL halts (the runner stops the other branches)."""
    fl, base = _take(progress, step)
    event = Event("step_failed", step, fl.attempt, error)
    key = _key("forward", step)
    failures = _bump(base.failures, key)
    spec = plan.get(step)
    base = _replace(base, failures=failures)
    if failures[key] < spec.max_attempts and not _halting(base):
        wait = _delay(spec.retry_delays, failures[key])
        if wait > 0:
            reading = ClockReading(now, 0.0, "", False) if clock is None else clock
            base = _replace(base, waits={**base.waits, step: arm(reading, wait)})
        return _change(progress, base, event)
    if base.failed_step is None and not base.cancelled:
        base = _replace(base, failed_step=step, error=error)
    return _settle(plan, progress, base, event)


def branch_cancelled(plan: Plan, progress: Progress, step: str, error: str) -> Change:
    """A branch step's attempt was stopped (another branch failed, or a cancel came): it may have
    taken effect, so its own compensation runs first in the rollback."""
    fl, base = _take(progress, step)
    base = _replace(base, undo_first=(*base.undo_first, step))
    return _settle(plan, progress, base, Event("step_failed", step, fl.attempt, error))


def branch_interrupted(plan: Plan, progress: Progress, step: str) -> Change:
    """A branch step's attempt was cut short by the agent dying: it runs again at its branch's
    position, until ``max_interrupts``; then it counts as failed (its own compensation first)."""
    fl, base = _take(progress, step)
    event = Event("step_failed", step, fl.attempt, INTERRUPTED)
    key = _key("forward", step)
    interrupts = _bump(base.interrupts, key)
    base = _replace(base, interrupts=interrupts)
    if interrupts[key] < plan.get(step).max_interrupts:
        return _settle(plan, progress, base, event)
    msg = f"step {step!r} was interrupted {interrupts[key]} times (max_interrupts); it is not run again."
    base = _replace(base, undo_first=(*base.undo_first, step))
    if base.failed_step is None and not base.cancelled:
        base = _replace(base, failed_step=step, error=msg)
    return _settle(plan, progress, base, event)


def _settle(plan: Plan, before: Progress, progress: Progress, event: Event) -> Change:
    """After a branch attempt's outcome: wait for the others still running; then a halted
    PARALLEL fails (saga rules, every branch's completed steps newest first), and one whose
    branches have all finished completes as one step of the outer path."""
    if progress.running:
        return _change(before, progress, event)
    parallel = progress.next_step
    assert parallel is not None
    if (progress.cancelled or progress.failed_step is not None) and progress.waits:
        progress = _replace(progress, waits=_NO_WAITS)  # a waiting branch DELAY just stops
    if progress.cancelled:
        if not progress.saga:
            after = _replace(
                progress, status=WorkflowStatus.CANCELLED, next_step=None, undo_first=()
            )
        else:
            after = _begin_rollback(plan, progress, None)
        return _change(before, after, event)
    if progress.failed_step is not None:
        failed_step = progress.failed_step
        base = _replace(progress, failed_step=parallel)  # `retry` resumes the PARALLEL
        return _forward_gave_up(plan, before, base, event, None, failed=failed_step)
    done = set(progress.completed)
    if any(s not in done for b in plan.get(parallel).branches for s in b):
        return _change(before, progress, event)
    nxt = plan.after(parallel)
    after = _replace(
        progress,
        completed=(*progress.completed, parallel),
        next_step=nxt,
        status=WorkflowStatus.COMPLETED if nxt is None else progress.status,
        undo_first=(),
    )
    change = _change(before, after, event, Event("step_completed", parallel))
    return change


# ------------------------------------------------------------------------------------------------
# DELAY


def _delay_step(plan: Plan, progress: Progress) -> str:
    action = next_action(progress, plan)
    if not isinstance(action, Delay):
        raise ValueError(f"No DELAY step is due ({action}).")
    return action.step


def delay_armed(plan: Plan, progress: Progress, mark: TimerMark) -> Change:
    """The due DELAY step begins: its timer ``mark`` commits with this change (the workflow
    stays ACTIVE, and nothing runs until the timer is due)."""
    step = _delay_step(plan, progress)
    if progress.timer is not None:
        raise ValueError(f"The timer of DELAY step {step!r} is armed already.")
    return Change(_replace(progress, timer=mark), (Event("step_started", step),))


def delay_rebased(plan: Plan, progress: Progress, mark: TimerMark) -> Change:
    """The waiting DELAY's timer as this agent run first sees it (``_clock.rebase``)."""
    _delay_step(plan, progress)
    if progress.timer is None:
        raise ValueError("No DELAY timer is armed.")
    return Change(_replace(progress, timer=mark))


def timer_rebased(progress: Progress, mark: TimerMark) -> Change:
    """The armed timer (a DELAY's or a PAUSED step's timeout) as this agent run first sees it."""
    if progress.timer is None:
        raise ValueError("No timer is armed.")
    return Change(_replace(progress, timer=mark))


def delay_finished(plan: Plan, progress: Progress, *, late_by: float | None = None) -> Change:
    """The DELAY's timer is due (``late_by`` None) or was due ``late_by`` seconds before the agent
    saw it again (it was down): the step completes and the workflow goes on, unless it is late
    and its ``on_late`` is ``fail``: then the step fails (saga rules; ``retry`` waits again)."""
    step = _delay_step(plan, progress)
    if progress.timer is None:
        raise ValueError(f"The timer of DELAY step {step!r} is not armed.")
    if late_by is not None and plan.get(step).on_late == "fail":
        error = (
            f"DELAY step {step!r} ended {late_by:.0f} s late, while the agent was down, and its "
            "on_late is fail; it did not go on"
        )
        event = Event("step_failed", step, None, error)
        base = _replace(progress, timer=None, failed_step=step, error=error)
        return _forward_gave_up(plan, progress, base, event, None)
    nxt = plan.after(step)
    after = _replace(
        progress,
        timer=None,
        status=WorkflowStatus.ACTIVE if nxt is not None else WorkflowStatus.COMPLETED,
        completed=(*progress.completed, step),
        next_step=nxt,
        error=None if nxt is None else progress.error,
    )
    return _change(progress, after, Event("step_completed", step))


# ------------------------------------------------------------------------------------------------
# max_lateness


def stamped(progress: Progress, at: Stamp) -> Progress:
    """``progress`` with its last forward completion at ``at`` (for ``max_lateness``)."""
    return _replace(progress, done_at=at)


def lateness_limit(plan: Plan, progress: Progress, step: str) -> float | None:
    """The ``max_lateness`` that applies to beginning forward ``step`` now: None when it has none
    or no step completed before it (in this workflow)."""
    if progress.done_at is None or not progress.completed or progress.cancelled:
        return None
    return plan.get(step).max_lateness


def deadline_missed(plan: Plan, progress: Progress, step: str, error: str) -> Change:
    """Forward ``step`` was due too long after the step before it finished (``max_lateness``):
    it does not run and fails for good (saga rules: a rollback, or FAILED past the pivot)."""
    action = next_action(progress, plan)
    if not isinstance(action, Run) or action.step != step or action.phase != "forward":
        raise ValueError(f"Step {step!r} is not what runs next ({action}).")
    event = Event("step_failed", step, None, error)
    base = _replace(progress, failed_step=step, error=error, not_before=None)
    return _forward_gave_up(plan, progress, base, event, None)


# ------------------------------------------------------------------------------------------------
# on_restart

#: The error of a workflow rolled back because the agent restarted (``on_restart: rollback``).
RESTARTED = (
    "the agent restarted while this workflow was ACTIVE and its outputs were set safe; it is "
    "rolled back (on_restart: rollback)"
)


def restarted(
    plan: Plan, progress: Progress, rule: str, *, cut: str | None = None
) -> Change | None:
    """Recovery found the workflow ACTIVE (running, or waiting in a DELAY) after a restart, its
    outputs set safe: ``rollback`` compensates its completed steps at once (``cut``, a step whose
    attempt the restart cut short, first: it may have taken effect), without saga mode it
    FAILS; ``restore`` and ``resume`` change nothing here (restore's outputs are the engine's).
    None when nothing changes: also for a workflow none of whose steps ran yet. A PAUSED or
    COMPENSATING workflow is left as it is (PAUSED: a person decides when it goes on)."""
    if rule != "rollback" or progress.status is not WorkflowStatus.ACTIVE:
        return None
    if progress.next_step is None or progress.inflight is not None:
        return None
    if not progress.completed and cut is None:
        return None  # nothing ran yet (it waited for a lease, say): nothing to be wrong about
    base = _replace(
        progress,
        failed_step=progress.next_step,
        error=RESTARTED,
        timer=None,
        not_before=None,
        waits=_NO_WAITS,
    )
    return _forward_gave_up(plan, progress, base, None, cut)
