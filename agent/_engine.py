"""The driver and the builder: a workflow's loop asks the saga state machine what runs next,
hands each attempt to :mod:`agent._invoke`, and commits the journal before the next side effect;
the builder loads definitions and creates and loads instances (resuming them after a restart is
:mod:`agent._recovery`'s)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple, cast
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ValidationError

from agent import _clock, _invoke, _recovery
from agent import _saga as saga
from agent._definition import (
    LoadedDefinition,
    LoadedStep,
    build_definition,
    discover,
    load_definition,
)
from agent._errors import (
    DeadlineMissed,
    DefinitionError,
    DiskFull,
    InvalidData,
    InvalidInput,
    InvalidTransition,
    UnknownWorkflowType,
    WorkflowNotActive,
    WorkflowNotFound,
)
from agent._invoke import oversize, size_text, unknown_fields
from agent._leases import LeaseManager
from agent._messages import Snapshot
from agent._messages import alert as make_alert
from agent._messages import snapshot as snapshot_of
from agent._status import RESUMABLE, WorkflowStatus
from agent._store import (
    InstanceRecord,
    JournalEnd,
    JournalStart,
    NewInstance,
    SQLiteStore,
    Transition,
    dumps,
    iso,
)
from agent._threads import DaemonPool
from agent._timers import TimerService

log = logging.getLogger("edgesaga.workflow")

#: What ``resume`` admits, in the words of its refusal.
RESUME_RULE = "only a PAUSED workflow (waiting for input at a HUMAN_INPUT step) can be resumed"


_random_pool = bytearray()


def _forget_random_pool() -> None:
    _random_pool.clear()  # a forked child must not hand out its parent's ids


os.register_at_fork(after_in_child=_forget_random_pool)


def new_workflow_id() -> str:
    """A random (version 4) UUID, as ``uuid.uuid4()`` but reading ``os.urandom`` once per 256
    ids: on small boards and VMs ``getrandom`` can cost more than the rest of a step."""
    if not _random_pool:
        _random_pool.extend(os.urandom(16 * 256))
    raw = bytes(_random_pool[-16:])
    del _random_pool[-16:]
    return str(uuid.UUID(bytes=raw, version=4))


#: Default limit of a workflow's serialized state (``max_state_bytes`` in the agent config).
DEFAULT_MAX_STATE_BYTES = 1024 * 1024


def _step_plan(s: LoadedStep) -> saga.StepPlan:
    spec = s.spec
    return saga.StepPlan(
        name=spec.name,
        compensable=s.compensate is not None,
        max_attempts=spec.retry.max_attempts,
        compensate_max_attempts=spec.compensate_retry.max_attempts,
        max_interrupts=spec.max_interrupts,
        automate_next=spec.automate_next,
        retry_delays=tuple(spec.retry.delay(n) for n in range(1, min(spec.retry.max_attempts, 64))),
        compensate_retry_delays=tuple(
            spec.compensate_retry.delay(n)
            for n in range(1, min(spec.compensate_retry.max_attempts, 64))
        ),
        kind=spec.type,
        next=spec.next,
        routes=tuple((spec.routes or {}).items()),
        default=spec.default,
        branches=tuple(tuple(b.name for b in branch) for branch in s.branches),
        pivot=spec.pivot,
        on_timeout=spec.on_timeout,
        on_late=spec.on_late,
        max_lateness=spec.max_lateness,
    )


def _plan(definition: LoadedDefinition) -> saga.Plan:
    steps = tuple(_step_plan(s) for s in definition.steps)
    inner = tuple(_step_plan(b) for s in definition.steps for br in s.branches for b in br)
    return saga.Plan(steps, inner)


class _BranchTimers(NamedTuple):
    """What a PARALLEL's branch timers say (``Workflow._branch_timers``)."""

    moved: bool  # a branch DELAY finished: the progress changed, decide again
    ready: tuple[str, ...] = ()  # branch steps that can begin now
    wait: float | None = None  # seconds until the earliest branch timer (None: none waits)
    on_sync: bool = False  # a branch timer waits (also) for the clock's sync

    @property
    def idle(self) -> bool:
        """No branch timer waits."""
        return self.wait is None and not self.on_sync

    @property
    def sleep(self) -> float:
        """How long a drive without the timer service waits before it decides again."""
        if self.wait is None:
            return _clock.SYNC_RECHECK
        return min(self.wait, _clock.SYNC_RECHECK) if self.on_sync else self.wait


class _Pending:
    """Journal rows and events waiting for the next commit."""

    __slots__ = ("events", "journal")

    def __init__(self) -> None:
        self.journal: list[JournalStart | JournalEnd] = []
        self.events: list[tuple[str, dict[str, Any]]] = []


class Workflow:
    """One workflow instance: its state model, status and progress, bound to a store.

    Create one with :meth:`WorkflowBuilder.create_workflow` or load one with
    :meth:`WorkflowBuilder.load_workflow`.
    """

    def __init__(
        self,
        *,
        builder: WorkflowBuilder,
        definition: LoadedDefinition,
        store: SQLiteStore,
        workflow_id: str,
        state: BaseModel,
        progress: saga.Progress,
        created_at: float,
        state_json: str | None = None,
    ) -> None:
        self.id = workflow_id
        self.definition = definition
        self.store = store
        self.state = state
        self.created_at = created_at
        self._builder = builder
        self._plan = builder._plan_for(definition)
        self._progress = progress
        self._state_json = state.model_dump_json() if state_json is None else state_json
        # The JSON of a state just built (and measured), for the next commit to reuse.
        self._json_of: tuple[BaseModel, str] | None = (
            None if state_json is None else (state, state_json)
        )
        self._lock = asyncio.Lock()
        self._cancel = asyncio.Event()
        self._stop = asyncio.Event()
        self._step_task: asyncio.Future[Any] | None = None
        #: The ``outputs`` of the running attempt's context: what a forward step commands, or what
        #: its forward step committed, for a compensation (see _prepare_outputs).
        self._step_outputs: dict[str, Any] = {}
        self._fresh = False  # the in-flight attempt was begun at creation and has not run yet
        self._cancel_reason = "cancelled on request"
        #: Why a PARALLEL's running branch steps were stopped (their attempts' error).
        self._branch_stop_reason = "stopped: another branch of the PARALLEL step failed"
        self._finished = asyncio.Event()
        if progress.status.is_terminal:
            self._finished.set()
        #: The drive left it waiting in a DELAY, with the builder's timer service.
        self._parked = False
        #: It can wait on the timer service: a DELAY, or a PARALLEL (a branch DELAY or back-off).
        self._timed = not {"DELAY", "PARALLEL"}.isdisjoint(self._plan.special.values())

    # -- public attributes -------------------------------------------------------------------------
    @property
    def workflow_type(self) -> str:
        return self.definition.workflow_type

    @property
    def status(self) -> WorkflowStatus:
        return self._progress.status

    @property
    def current_step(self) -> str | None:
        return self._progress.current_step

    @property
    def error(self) -> str | None:
        return self._progress.error

    @property
    def saga_mode(self) -> bool:
        return self._progress.saga

    @property
    def progress(self) -> saga.Progress:
        """The saga progress (completed steps, compensations, counters), read-only."""
        return self._progress

    @property
    def waiting_for(self) -> list[str]:
        """Resources this workflow waits to lease (empty when it does not wait)."""
        return sorted(self._builder.leases.waiting(self.id))

    @property
    def _paused(self) -> bool:
        return self._progress.status is WorkflowStatus.PAUSED

    @property
    def in_delay(self) -> bool:
        """True while its DELAY step is due or waits (armed or not yet: an ``until:`` before
        the clock's sync), or its PARALLEL only waits: on branch DELAYs or retry back-offs,
        with no branch attempt running (``saga.branch_waiting``)."""
        p = self._progress
        if p.status is not WorkflowStatus.ACTIVE or p.inflight is not None or p.next_step is None:
            return False
        kind = self._plan.special.get(p.next_step)
        if kind == "PARALLEL":
            return saga.branch_waiting(self._plan, p)
        return kind == "DELAY"

    @property
    def is_running(self) -> bool:
        """True while a coroutine drives this workflow."""
        return self._lock.locked()

    def __repr__(self) -> str:
        return f"<Workflow {self.workflow_type} {self.id} {self.status.value} step={self.current_step}>"

    def enable_saga_mode(self) -> None:
        """Turn on saga mode: a failure compensates the completed steps, newest first.

        The flag is stored with the next commit (pass ``saga=True`` to ``create_workflow`` to store it
        with the instance row itself)."""
        if not self._progress.saga:
            self._progress = self._progress._replace(saga=True)

    def snapshot(self) -> Snapshot:
        """The workflow as it is now (the core of the retained state and of a list row); a
        PAUSED one adds ``waiting_input`` (see :attr:`waiting_input`)."""
        snap = snapshot_of(
            self.id, self.workflow_type, self.status.value, self.current_step, self.error
        )
        if self._progress.status is WorkflowStatus.PAUSED:
            cast(dict[str, Any], snap)["waiting_input"] = self.waiting_input
        return snap

    @property
    def waiting_input(self) -> dict[str, Any] | None:
        """For a PAUSED workflow, what it waits for: ``{"step", "schema" (the input model's JSON
        Schema, None without one), "timeout" (s or None), "approve_with" (a device or None)}``."""
        p = self._progress
        if p.status is not WorkflowStatus.PAUSED or p.next_step is None:
            return None
        step = self.definition.step(p.next_step)
        model = step.input_model
        return {
            "step": step.name,
            "schema": None if model is None else model.model_json_schema(),
            "timeout": step.spec.timeout,
            "approve_with": step.spec.approve_with,
        }

    async def resume(self, data: dict[str, Any] | None = None) -> Workflow:
        """Give the PAUSED workflow its input: ``data`` is checked against the step's
        ``input_model`` (missing keys take the model's defaults), merged into the state and
        committed with status ACTIVE in one transition. Raises :class:`InvalidInput` (the
        workflow stays PAUSED) or :class:`InvalidTransition` (it is not PAUSED). The caller
        drives it on (``run()``, or submits it to its runner)."""
        if self.status is not WorkflowStatus.PAUSED:
            raise self._refused(RESUME_RULE)
        async with self._lock:
            if self.status is not WorkflowStatus.PAUSED:
                raise self._refused(RESUME_RULE)
            step = self.definition.step(self._progress.next_step or "")
            state = self._with_input(step, data)
            self._builder._disarm_pause(self.id)
            self.state = state
            now = time.time()
            pending = _Pending()
            self._apply(pending, saga.resume(self._plan, self._progress), now)
            await self._commit(pending, now)
            if self.status.is_terminal:
                self._on_terminal()
        return self

    def _with_input(self, step: LoadedStep, data: dict[str, Any] | None) -> BaseModel:
        """The state with ``data`` (checked against the step's input model) merged in."""
        model = step.input_model
        data = data or {}
        stays = "The workflow stays PAUSED."
        if model is None:
            if data:
                raise InvalidInput(
                    f"Step {step.name!r} takes no input (it has no input_model); resume it with "
                    f"no data. {stays}",
                    workflow_id=self.id,
                )
            return self.state
        unknown = unknown_fields(model, data)
        if unknown:
            raise InvalidInput(
                f"Field {unknown[0]!r} is not a field of {model.__name__} (fields: "
                f"{', '.join(model.model_fields)}). {stays}",
                workflow_id=self.id,
                field=unknown[0],
            )
        try:
            values = model.model_validate(data).model_dump()
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "(data)"
            raise InvalidInput(
                f"Field {where!r}: {first['msg']}. {stays}", workflow_id=self.id, field=where
            ) from None
        merged = {**self.state.model_dump(), **values}
        try:
            state = type(self.state).model_validate(merged)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise InvalidInput(
                f"Field {where!r} does not fit the state: {first['msg']}. {stays}",
                workflow_id=self.id,
                field=where,
            ) from None
        size = oversize(state.model_dump_json(), self._builder.max_state_bytes)
        if size is not None:
            raise InvalidInput(
                f"The state with this input is {size_text(size)} of JSON, over max_state_bytes. "
                f"{stays}",
                workflow_id=self.id,
            )
        return state

    async def expire_pause(self) -> bool:
        """The PAUSED step's timeout passed: apply its ``on_timeout`` (``continue``: the input
        model's defaults; ``fail``: the step fails, saga rules apply). False when it is no longer
        PAUSED (input came first)."""
        async with self._lock:
            p = self._progress
            if p.status is not WorkflowStatus.PAUSED or p.next_step is None:
                return False
            step = self.definition.step(p.next_step)
            rule = step.spec.on_timeout
            if rule == "continue":
                try:
                    self.state = self._with_input(step, None)
                except InvalidInput as exc:  # a required field: no defaults to go on with
                    log.warning("workflow %s: %s; the step fails instead", self.id, exc)
                    rule = "fail"
            error = (
                f"no input came for step {step.name!r} within its timeout of "
                f"{step.spec.timeout:g} s"
                if step.spec.timeout
                else None
            )
            self._builder._disarm_pause(self.id)
            await self._commit_change(saga.pause_timed_out(self._plan, p, rule, error=error))
        return True

    async def _cancel_paused(self) -> None:
        """A cancel of a PAUSED workflow (no driver holds it): saga mode compensates its
        completed steps (the caller drives the rollback), else it ends CANCELLED now."""
        change = saga.cancel(self._plan, self._progress, reason=self._cancel_reason)
        self._builder._disarm_pause(self.id)
        await self._commit_change(change)

    async def wait(self) -> WorkflowStatus:
        """Wait until the workflow reaches a terminal status."""
        await self._finished.wait()
        return self.status

    # -- driving -----------------------------------------------------------------------------------
    async def next_step(self) -> dict[str, Any] | None:
        """Run the next step (retries included) and, with ``automate_next``, the ones after it.

        A step failure is recorded, not raised: in saga mode the rollback runs to its end before this
        returns. Returns the last completed step's result. Raises :class:`WorkflowNotActive` when the
        workflow is not ``ACTIVE``.
        """
        if self.status is not WorkflowStatus.ACTIVE:
            raise WorkflowNotActive(self.id, self.status.value)
        async with self._lock:
            if self.status is not WorkflowStatus.ACTIVE:
                raise WorkflowNotActive(self.id, self.status.value)
            return await self._drive(single=True)

    async def run(self) -> WorkflowStatus:
        """Drive the workflow until it is no longer ``ACTIVE`` (or ``COMPENSATING``)."""
        async with self._lock:
            self._stop.clear()
            self._parked = False
            if self._progress.status is WorkflowStatus.PAUSED and self._cancel.is_set():
                await self._cancel_paused()
            while self.status in RESUMABLE and not self._stop.is_set() and not self._parked:
                await self._drive(single=False)
        return self.status

    async def apply_on_restart(self, cut: str | None = None) -> str | None:
        """For recovery, once per agent start: what the definition's ``on_restart`` says for a
        workflow that was ACTIVE (its outputs were set safe at start). ``rollback``: its rollback
        is committed (driven by whoever runs it next); ``restore``: its outputs are driven back to
        the values its completed steps commanded (``max_lateness`` of the next step still
        applies when it is driven); ``resume``: nothing. ``cut`` is the forward step whose
        attempt the restart cut short. Returns the rule applied, None when none applied."""
        rule = self.definition.spec.restart_rule
        async with self._lock:
            if self._progress.status is not WorkflowStatus.ACTIVE or rule == "resume":
                return None
            if rule == "restore":
                await self._restore_outputs()
                return rule
            change = saga.restarted(self._plan, self._progress, rule, cut=cut)
            if change is None:
                return None
            log.warning("workflow %s: %s", self.id, saga.RESTARTED)
            await self._commit_change(change)
            return rule

    async def _restore_outputs(self) -> None:
        """Drive every output the completed (not undone) steps commanded back to its value, in
        the order they commanded them."""
        hw = self._builder.hardware
        if hw is None:
            return
        done = set(self._progress.completed) - set(self._progress.compensated)
        commanded = await self.store.commanded_outputs(self.id)
        for step, outputs in commanded.items():
            if step not in done:
                continue
            for device, record in outputs.items():
                value = record.get("value") if isinstance(record, dict) else None
                if value is None:
                    continue
                try:
                    hw[device].set(value)
                except Exception:
                    log.exception("workflow %s: could not restore %s to %r", self.id, device, value)
                    continue
                log.info("workflow %s: restored %s to %r (step %s)", self.id, device, value, step)

    async def rebase_pause_timer(self) -> None:
        """A PAUSED workflow's timeout mark, rebased onto this agent run (committed) if an
        earlier run or boot armed it."""
        async with self._lock:
            mark = self._progress.timer
            if self._progress.status is not WorkflowStatus.PAUSED or mark is None:
                return
            reading = _clock.read_clock(self._builder.clock)
            if not self._builder.needs_rebase(mark, reading):
                return
            change = saga.timer_rebased(self._progress, _clock.rebase(mark, reading))
            await self._commit_change(change, settle=False)

    async def settle_timer(self) -> bool:
        """For recovery: rebase a waiting DELAY's timer onto this run (committed) and hand it to
        the timer service. True when it is to be driven now (due, late, or not waiting)."""
        async with self._lock:
            if not self.in_delay or self._builder.timers is None:
                return True
            pending = _Pending()
            now = time.time()
            p = self._progress
            if self._plan.special.get(p.next_step or "") != "PARALLEL":
                go = await self._delay(pending, now)
                if pending.journal or pending.events:
                    await self._commit(pending, now)
                return go
            timing = self._branch_timers(pending, saga.branch_actions(self._plan, p), now)
            if self._progress is not p:  # armed, rebased or finished: committed before it waits
                await self._commit(pending, now)
            if timing.moved or timing.ready:
                return True
            return not self._park_branches(timing)

    def request_stop(self) -> None:
        """Ask the driving coroutine to stop at the next checkpoint (after the running attempt is
        recorded), leaving the workflow ACTIVE for recovery. Used at shutdown."""
        self._stop.set()

    async def cancel(self, reason: str = "cancelled on request") -> WorkflowStatus:
        """Cancel: in saga mode the completed steps are compensated first; ends in ``CANCELLED``.

        When another task is driving the workflow, the cancel is handed to it (an async step in
        flight is stopped and, since it may have taken effect, compensated) and this returns at once;
        otherwise the rollback runs here.
        """
        if not saga.can_cancel(self.status):
            raise self._refused(saga.CANCEL_RULE)
        self.request_cancel(reason)
        if not self._lock.locked():
            await self.run()
        return self.status

    def request_cancel(self, reason: str = "cancelled on request") -> None:
        """Flag the workflow for cancellation; whoever drives it next (or now) carries it out."""
        self._cancel_reason = reason
        self._cancel.set()
        task = self._step_task
        if task is not None:
            # Not task.cancel() now: an async step's first part ran inline (see
            # _invoke.start_eagerly) and its task may not have taken its first step yet; cancelled
            # then, the step would never see the CancelledError (its clean-up would not run). The
            # task's first step is already in the loop's queue, so a cancel queued behind it
            # reaches the step itself.
            task.get_loop().call_soon(task.cancel)

    async def retry(self) -> WorkflowStatus:
        """Retry a ``FAILED`` workflow from its failed step, or the failed compensations of a
        ``COMPENSATION_FAILED`` one; then drive it."""
        await self.prepare_retry()
        return await self.run()

    async def prepare_retry(self) -> None:
        """Record the retry (status back to ACTIVE or COMPENSATING) without driving it yet.

        Refused at once (not after the running attempt) unless the workflow is FAILED or
        COMPENSATION_FAILED."""
        if not saga.can_retry(self.status):
            raise self._refused(saga.RETRY_RULE)
        async with self._lock:
            try:
                change = saga.retry(self._plan, self._progress)
            except ValueError:
                raise self._refused(saga.RETRY_RULE) from None
            self._finished.clear()
            self._cancel.clear()
            await self._commit_change(change, settle=False)

    def _refused(self, rule: str) -> InvalidTransition:
        """An operator command the workflow's status does not admit; ``rule`` says which do."""
        status = self.status.value
        return InvalidTransition(self.id, status, f"Workflow {self.id} is {status}; {rule}.")

    async def mark_interrupted(self, *, journal_ended: bool = False) -> None:
        """Record the attempt the store has as started and not ended (the agent died while it
        ran) as interrupted: the outer attempt and every PARALLEL branch attempt.

        ``journal_ended``: their journal rows are ended already (recovery's one pass over the
        store before READY, ``SQLiteStore.mark_interrupted_attempts``); only the state machine's
        rule is applied and committed, with no second write of those rows."""
        now = time.time()
        pending = _Pending()
        cut = False
        for branch in self._progress.running:  # a PARALLEL's branch attempts, each on its own
            if not journal_ended:
                pending.journal.append(JournalEnd(branch.seq, "interrupted", now, saga.INTERRUPTED))
            change = saga.branch_interrupted(self._plan, self._progress, branch.step)
            self._apply(pending, change, now)
            cut = True
            log.warning(
                "workflow %s: branch step %s attempt %d was interrupted",
                self.id,
                branch.step,
                branch.attempt,
            )
        fl = self._progress.inflight
        if fl is not None:
            if not journal_ended:
                pending.journal.append(JournalEnd(fl.seq, "interrupted", now, saga.INTERRUPTED))
            self._apply(pending, saga.interrupted(self._plan, self._progress), now)
            cut = True
            log.warning(
                "workflow %s: %s step %s attempt %d was interrupted",
                self.id,
                fl.phase,
                fl.step,
                fl.attempt,
            )
        if cut:
            await self._commit(pending, now)

    async def _drive(self, *, single: bool) -> dict[str, Any] | None:
        pending = _Pending()
        result: dict[str, Any] | None = None
        leaving = False  # cancelled (shutdown) or the loop closing: let go of the devices
        try:
            if (self._progress.inflight is not None or self._progress.running) and not self._fresh:
                # Loaded with an attempt the store has as started and not ended (the agent died,
                # or it was begun with the instance and the object dropped): it was cut short.
                await self.mark_interrupted()
            if not await self._hold_resources():
                return None  # stopped (shutdown) before its turn: nothing ran, nothing to commit
            while (attempt := await self._next_attempt(pending)) is not None:
                if isinstance(attempt, str):  # a PARALLEL step: its branches run side by side
                    await self._run_parallel(pending, attempt)
                    if self._parked or (single and not self._plan.get(attempt).automate_next):
                        break
                    continue
                step, before = attempt
                fl = before.inflight
                assert fl is not None
                await self._prepare_outputs(fl)
                outcome = await _invoke.execute(self, step, fl)
                self._record_outcome(pending, before, fl, outcome, time.time())
                if outcome.ok:
                    result = outcome.result
                    if (
                        single
                        and fl.phase == "forward"
                        and not saga.continues(self._plan, before, self._progress)
                    ):
                        break
            if pending.journal or pending.events:
                await self._commit(pending, time.time())
        except Exception as exc:
            await self._internal_failure(exc)
        except BaseException:
            leaving = True
            raise
        finally:
            timers = self._builder.timers
            if self._timed and not self._parked and timers is not None and not self._paused:
                timers.forget(self.id)  # it went on (or ended) without the service
            if self.status.is_terminal:
                self._on_terminal()
            elif leaving or self._stop.is_set():
                self._let_go()
        return result

    async def _next_attempt(
        self, pending: _Pending
    ) -> tuple[LoadedStep, saga.Progress] | str | None:
        """The step to run next and the progress with its attempt begun, its "started" record
        committed (with what ``pending`` holds); the name of a PARALLEL step that is due; None
        when nothing runs now: stopped, finished, or waiting for someone (a HUMAN_INPUT step
        pauses here). A cancel is applied here, and a retry's backoff waited for."""
        while True:
            now = time.time()
            if self._fresh:
                # The first attempt was begun in the create transaction.
                self._fresh = False
                self._builder._begun.pop(self.id, None)
                before = self._progress
                fl = before.inflight
                assert fl is not None
                if self._cancel.is_set():
                    self._cancel_unrun(pending, before, fl, now)
                    continue
                return self.definition.step(fl.step), before
            if self._stop.is_set():
                return None
            if self._cancel.is_set() and saga.can_cancel(self.status):
                change = saga.cancel(self._plan, self._progress, reason=self._cancel_reason)
                self._apply(pending, change, now)
            action = saga.next_action(self._progress, self._plan)
            if not isinstance(action, saga.Run):
                if isinstance(action, saga.Fork):
                    return action.step
                if isinstance(action, saga.Pause):
                    timeout = self.definition.step(action.step).spec.timeout
                    mark = None
                    if timeout is not None:  # durable: it survives a restart, never early
                        mark = _clock.arm(_clock.read_clock(self._builder.clock), timeout)
                    self._apply(pending, saga.pause(self._plan, self._progress, mark), now)
                    await self._commit(pending, now)
                    self._builder._arm_pause(self)
                if isinstance(action, saga.Delay) and await self._delay(pending, now):
                    continue
                return None  # Stop, or waiting in a DELAY
            backoff = self._backoff_left(pending, now)
            if backoff is None and action.not_before is not None and action.not_before > now:
                backoff = action.not_before - now  # a back-off stored without a timer
            if backoff is not None and backoff > 0:
                await self._commit(pending, now)
                await self._sleep_for(backoff)
                continue
            if action.phase == "forward" and self._late(pending, action.step, now):
                continue
            before = self._begin(pending, action.step, action.phase, now)
            await self._commit(pending, now)  # "started, attempt n" before the side effect
            return self.definition.step(action.step), before

    async def _run_parallel(self, pending: _Pending, name: str) -> None:
        """Drive the PARALLEL step ``name``: its branch steps run as tasks, and this loop applies
        each outcome to the one progress as it comes (so the workflow's commits stay in order),
        until the step completes or fails. A failed branch (or a cancel) stops the others: an
        async step at its next await, a sync one is waited for and its result recorded."""
        tasks: dict[asyncio.Future[_invoke.BranchOutcome], tuple[LoadedStep, saga.Inflight]] = {}
        try:
            while True:
                now = time.time()
                # (Not once the last branch's outcome ended the PARALLEL: COMPENSATING or
                # FAILED admits no cancel, and the rollback already runs.)
                if (
                    self._cancel.is_set()
                    and not self._progress.cancelled
                    and saga.can_cancel(self.status)
                ):
                    change = saga.cancel(self._plan, self._progress, reason=self._cancel_reason)
                    self._branch_stop_reason = self._cancel_reason
                    self._apply(pending, change, now)
                p = self._progress
                if p.status is not WorkflowStatus.ACTIVE or p.next_step != name:
                    break  # it completed, or failed and the rollback (or FAILED) follows
                if p.cancelled or p.failed_step is not None:
                    self._stop_branches(tasks)
                actions = () if self._stop.is_set() else saga.branch_actions(self._plan, p)
                timing = self._branch_timers(pending, actions, now)
                timed = self._progress is not p  # a branch timer was armed, rebased or finished
                if timing.moved:  # a branch DELAY ended: decide again from the new progress
                    await self._commit(pending, now)
                    continue
                for ready in timing.ready:
                    change = saga.branch_begin(self._plan, self._progress, ready)
                    fl = change.progress.running[-1]
                    pending.journal.append(
                        JournalStart(fl.seq, fl.step, "forward", fl.attempt, now)
                    )
                    self._apply(pending, change, now)
                if timed or pending.journal or pending.events:
                    await self._commit(pending, now)  # "started" before the side effects
                for ready in timing.ready:
                    step = self.definition.step(ready)
                    fl = next(f for f in self._progress.running if f.step == ready)
                    task = asyncio.ensure_future(_invoke.execute_branch(self, step, fl))
                    tasks[task] = (step, fl)
                if not tasks:
                    if not actions:
                        break  # stopped (shutdown), or nothing left that can run
                    if self._park_branches(timing):
                        return  # only timers wait: the timer service wakes it, no task holds it
                    await self._sleep_for(timing.sleep)
                    continue
                await self._wait_branches(tasks, None if timing.idle else timing.sleep)
                for done in [t for t in tasks if t.done()]:
                    step, fl = tasks.pop(done)
                    if done.cancelled():  # stopped before its first line ran: no effect taken
                        unrun = _invoke.Outcome(False, error=self._branch_stop_reason)
                        result = _invoke.BranchOutcome(unrun)
                    else:
                        result = done.result()
                    self._record_branch(pending, step, fl, result, time.time())
                    await self._commit(pending, time.time())
        finally:
            for left in tasks:  # only when this driver itself is cancelled (shutdown)
                left.cancel()

    def _branch_timers(
        self, pending: _Pending, actions: Iterable[saga.Run | saga.Delay], now: float
    ) -> _BranchTimers:
        """Arm, rebase (onto this agent run) and decide the timers of the branch positions
        ``actions``: a branch DELAY's, a branch step's retry back-off. A DELAY that is due (or
        late) is finished at once, and then nothing else is decided (``moved``: the progress
        changed); otherwise the steps that can begin now and what the others wait for."""
        reading = _clock.read_clock(self._builder.clock)
        ready: list[str] = []
        wait: float | None = None
        on_sync = False
        for action in actions:
            step = action.step
            mark = self._progress.waits.get(step)
            if mark is None:
                if isinstance(action, saga.Run):
                    ready.append(step)
                    continue
                armed = self._arm_delay(reading, step)
                if isinstance(armed, _clock.NeedsSync):
                    on_sync = True  # an `until:` before the clock's sync
                    continue
                change = saga.branch_delay_armed(self._plan, self._progress, step, armed)
                self._apply(pending, change, now)
                mark = armed
            elif self._builder.needs_rebase(mark, reading):
                mark = _clock.rebase(mark, reading)
                self._apply(pending, saga.branch_timer_rebased(self._progress, step, mark), now)
            decision = _clock.decide(mark, reading)
            if isinstance(decision, _clock.Wait):
                wait = decision.seconds if wait is None else min(wait, decision.seconds)
                on_sync = on_sync or _clock.waits_on_sync(mark, reading)
            elif isinstance(decision, _clock.NeedsSync):
                on_sync = True
            elif isinstance(action, saga.Run):
                ready.append(step)  # its back-off is over
            else:
                late = decision.by if isinstance(decision, _clock.Late) else None
                change = saga.branch_delay_finished(self._plan, self._progress, step, late_by=late)
                self._apply(pending, change, now)
                return _BranchTimers(moved=True)
        return _BranchTimers(False, tuple(ready), wait, on_sync)

    def _park_branches(self, timing: _BranchTimers) -> bool:
        """Hand the PARALLEL's wait (nothing runs: only branch timers wait) to the timer
        service, as an outer DELAY's; False without one (the CLI: the drive sleeps)."""
        timers = self._builder.timers
        if timers is None or (timing.wait is None and not timing.on_sync):
            return False
        if timing.wait is None:
            timers.watch_sync(self.id)
        else:
            timers.watch(self.id, timing.wait, on_sync=timing.on_sync)
        self._parked = True
        return True

    async def _wait_branches(
        self, tasks: Iterable[asyncio.Future[Any]], wake_in: float | None = None
    ) -> None:
        """Until a branch attempt ends, a cancel comes, or ``wake_in`` seconds (a branch timer)
        pass."""
        watch: set[asyncio.Future[Any]] = set(tasks)
        cancelled = None
        if not self._progress.cancelled:  # a cancel already applied must not wake this again
            cancelled = asyncio.ensure_future(self._cancel.wait())
            watch.add(cancelled)
        try:
            await asyncio.wait(watch, timeout=wake_in, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if cancelled is not None:
                cancelled.cancel()

    def _stop_branches(
        self, tasks: dict[asyncio.Future[_invoke.BranchOutcome], tuple[LoadedStep, saga.Inflight]]
    ) -> None:
        """Stop the running async branch steps (a sync step on a thread cannot be stopped: its
        result is waited for and recorded)."""
        for task, (step, _fl) in tasks.items():
            if (
                not task.done()
                and step.function is not None
                and _invoke.step_is_async(step.function)
            ):
                task.cancel()

    def _record_branch(
        self,
        pending: _Pending,
        step: LoadedStep,
        fl: saga.Inflight,
        branch: _invoke.BranchOutcome,
        now: float,
    ) -> None:
        """Feed a branch attempt's outcome to the state machine; a result merges into the state
        as it is now (completion order)."""
        outcome = branch.outcome
        if outcome.ok:
            outcome = _invoke.merge_branch(self, step, branch.result)
        if outcome.ok:
            assert outcome.state is not None
            self.state = outcome.state
            outputs = dumps(branch.outputs) if branch.outputs else None
            pending.journal.append(JournalEnd(fl.seq, "completed", now, None, outputs))
            self._apply(pending, saga.branch_succeeded(self._plan, self._progress, fl.step), now)
            return
        error = outcome.error or "failed"
        if outcome.cancelled:
            pending.journal.append(JournalEnd(fl.seq, "cancelled", now, error))
            self._apply(
                pending, saga.branch_cancelled(self._plan, self._progress, fl.step, error), now
            )
        else:
            pending.journal.append(JournalEnd(fl.seq, "failed", now, error))
            reading = _clock.read_clock(self._builder.clock)
            change = saga.branch_failed(
                self._plan, self._progress, fl.step, error, now=now, clock=reading
            )
            self._apply(pending, change, now)
        log.warning(
            "workflow %s branch step %s attempt %d failed: %s", self.id, fl.step, fl.attempt, error
        )

    async def _prepare_outputs(self, fl: saga.Inflight) -> None:
        """A forward attempt reports what it commands in a fresh dict; a compensation gets what
        its forward step's completed attempt committed (read from the journal, so also after a
        restart)."""
        if fl.phase == "compensate":
            commanded = await self.store.commanded_outputs(self.id)
            self._step_outputs = commanded.get(fl.step, {})
        else:
            self._step_outputs = {}

    def _record_outcome(
        self,
        pending: _Pending,
        before: saga.Progress,
        fl: saga.Inflight,
        outcome: _invoke.Outcome,
        now: float,
    ) -> None:
        """Feed an attempt's outcome to the state machine; its journal row and events wait in
        ``pending`` for the next commit."""
        if outcome.ok:
            assert outcome.state is not None
            self.state = outcome.state
            outputs = self._step_outputs if fl.phase == "forward" else None
            # What the step commanded is committed with its result: its compensation reads it.
            done = JournalEnd(fl.seq, "completed", now, None, dumps(outputs) if outputs else None)
            pending.journal.append(done)
            if fl.phase == "forward" and self._plan.special.get(fl.step) == "DECISION":
                self._apply(pending, saga.decided(self._plan, before, outcome.route), now)
                return
            self._apply(pending, saga.succeeded(self._plan, before), now)
            return
        error = outcome.error or "failed"
        if outcome.cancelled:
            pending.journal.append(JournalEnd(fl.seq, "cancelled", now, error))
            self._apply(pending, saga.cancel_inflight(self._plan, before, error), now)
        else:
            pending.journal.append(JournalEnd(fl.seq, "failed", now, error))
            reading = _clock.read_clock(self._builder.clock)
            change = saga.failed(self._plan, before, error, now=now, clock=reading)
            self._apply(pending, change, now)
        log.warning(
            "workflow %s step %s (%s) attempt %d failed: %s",
            self.id,
            fl.step,
            fl.phase,
            fl.attempt,
            outcome.error,
        )

    def _cancel_unrun(
        self, pending: _Pending, before: saga.Progress, fl: saga.Inflight, now: float
    ) -> None:
        """A cancel came before the attempt begun with the instance ran (the workflow waited for
        the runner): the step never took effect, so its attempt ends failed by the cancel, which
        compensates only what completed (nothing) and ends CANCELLED; the step is not run."""
        reason = self._cancel_reason
        marked = saga.cancel(self._plan, before, reason=reason)
        pending.journal.append(JournalEnd(fl.seq, "cancelled", now, reason))
        self._apply(pending, marked, now)
        self._apply(pending, saga.failed(self._plan, marked.progress, reason, now=now), now)

    def _begin(self, pending: _Pending, step: str, phase: saga.Phase, now: float) -> saga.Progress:
        change = saga.begin(self._progress, step, phase)
        fl = change.progress.inflight
        assert fl is not None
        pending.journal.append(JournalStart(fl.seq, fl.step, fl.phase, fl.attempt, now))
        self._apply(pending, change, now)
        return change.progress

    async def _delay(self, pending: _Pending, now: float) -> bool:
        """The due DELAY step: arm its timer, or rebase it onto this run, and decide it with the
        clock rules. True when the loop goes on (it finished or failed, or a cancel or stop
        came); False when it waits, parked with the builder's timer service (nothing holds a
        task for it). Without a timer service (the CLI) it waits here."""
        b = self._builder
        while True:
            reading = _clock.read_clock(b.clock)
            mark = self._progress.timer
            decision: _clock.Decision
            if mark is None:
                armed = self._arm_delay(reading, self._progress.next_step or "")
                if isinstance(armed, _clock.TimerMark):
                    self._apply(pending, saga.delay_armed(self._plan, self._progress, armed), now)
                    await self._commit(pending, now)
                    continue
                decision = armed
            elif b.needs_rebase(mark, reading):
                mark = _clock.rebase(mark, reading)
                self._apply(pending, saga.delay_rebased(self._plan, self._progress, mark), now)
                await self._commit(pending, now)
                continue
            else:
                decision = _clock.decide(mark, reading)
            if isinstance(decision, _clock.Due | _clock.Late):
                late = decision.by if isinstance(decision, _clock.Late) else None
                self._apply(
                    pending, saga.delay_finished(self._plan, self._progress, late_by=late), now
                )
                if late is not None and self._plan.stamps:
                    # A late DELAY finished when it was due, not when the agent saw it again.
                    w, bt, boot, synced = reading
                    stamp = _clock.Stamp(w - late, bt - late, boot, synced)
                    self._progress = saga.stamped(self._progress, stamp)
                return True
            if pending.journal or pending.events:
                await self._commit(pending, now)
            wait = decision.seconds if isinstance(decision, _clock.Wait) else None
            if b.timers is not None:
                if wait is None:
                    b.timers.watch_sync(self.id)
                else:
                    on_sync = mark is not None and _clock.waits_on_sync(mark, reading)
                    b.timers.watch(self.id, wait, on_sync=on_sync)
                self._parked = True
                return False
            await self._sleep_for(_clock.SYNC_RECHECK if wait is None else wait)
            if self._stop.is_set() or self._cancel.is_set():
                return True
            now = time.time()

    def _backoff_left(self, pending: _Pending, now: float) -> float | None:
        """Seconds a retry's back-off has left by its durable timer (rebased onto this run first,
        so a restart never retries early, whatever the wall clock did); None without one."""
        mark = self._progress.timer
        if mark is None:
            return None
        reading = _clock.read_clock(self._builder.clock)
        if self._builder.needs_rebase(mark, reading):
            mark = _clock.rebase(mark, reading)
            self._apply(pending, saga.timer_rebased(self._progress, mark), now)
        decision = _clock.decide(mark, reading)
        return decision.seconds if isinstance(decision, _clock.Wait) else 0.0

    def _late(self, pending: _Pending, step: str, now: float) -> bool:
        """Whether forward ``step`` is due beyond its ``max_lateness`` after the step before it
        finished; if so its failure (``DeadlineMissed``) is applied to ``pending``."""
        limit = saga.lateness_limit(self._plan, self._progress, step)
        done = self._progress.done_at
        if limit is None or done is None:
            return False
        late = _clock.elapsed(done, _clock.read_clock(self._builder.clock))
        if late is not None and late <= limit:
            return False
        error = DeadlineMissed(step, self._progress.completed[-1], limit, late)
        log.warning("workflow %s: %s", self.id, error)
        self._apply(
            pending, saga.deadline_missed(self._plan, self._progress, step, str(error)), now
        )
        return True

    def _arm_delay(
        self, reading: _clock.ClockReading, step: str
    ) -> _clock.TimerMark | _clock.NeedsSync:
        spec = self.definition.step(step).spec
        if spec.until is None:
            return _clock.arm(reading, spec.duration or 0.0)
        tz = _clock.local_zone() if spec.timezone is None else ZoneInfo(spec.timezone)
        return _clock.arm_until(reading, spec.until, tz)

    async def _sleep_for(self, seconds: float) -> None:
        delay = max(0.0, seconds)
        waiters = [
            asyncio.ensure_future(self._cancel.wait()),
            asyncio.ensure_future(self._stop.wait()),
        ]
        try:
            await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    async def _hold_resources(self) -> bool:
        """Lease the workflow's resources; False when it is stopped (shutdown) before its turn.

        A workflow still waiting for them when it is cancelled, with nothing to undo, is cancelled
        without waiting for its turn; one with something to undo waits (its compensations need the
        devices), but not past a stop. However the wait ends, a waiter left behind is withdrawn.
        """
        resources = self.definition.spec.resources
        if not resources:
            return True
        acquire = asyncio.ensure_future(self._builder.leases.acquire(self.id, resources))
        stopped = asyncio.ensure_future(self._stop.wait())
        cancelled = asyncio.ensure_future(self._cancel.wait())
        watch = {acquire, stopped, cancelled}
        try:
            while not acquire.done() and not stopped.done():
                await asyncio.wait(watch, return_when=asyncio.FIRST_COMPLETED)
                if cancelled in watch and cancelled.done():
                    if not self._progress.completed and self._progress.inflight is None:
                        return True  # nothing to undo: it is cancelled without the devices
                    watch.discard(cancelled)  # compensations need the devices: wait for them
            if acquire.done():
                acquire.result()
                return True
            return False
        finally:
            stopped.cancel()
            cancelled.cancel()
            if not acquire.done():
                acquire.cancel()
                # Not `await acquire`: that would swallow a cancel of this task along with its own.
                await asyncio.wait({acquire})

    def _drive_safe(self, resources: list[str]) -> None:
        hw = self._builder.hardware
        if resources and hw is not None:
            try:
                hw.safe_state(resources)
            except Exception:
                log.exception(
                    "workflow %s: could not drive %s to their safe values", self.id, resources
                )

    def _on_terminal(self) -> None:
        # Only the devices this workflow holds: one cancelled while it waited holds none, and must
        # not switch off what another workflow is driving.
        if self.status is not WorkflowStatus.COMPLETED:
            self._drive_safe(sorted(self._builder.leases.held_by(self.id)))
        self._builder.leases.release(self.id)
        self._finished.set()

    def _let_go(self) -> None:
        """The workflow stops without finishing (shutdown, or its driver was cancelled): the
        outputs it holds go to their safe values and its leases are released, so neither a device
        left on nor a workflow waiting for it outlives the driver. Recovery resumes it."""
        self._drive_safe(sorted(self._builder.leases.held_by(self.id)))
        self._builder.leases.release(self.id)

    async def _internal_failure(self, exc: Exception) -> None:
        """An exception escaped the driver (a bug, or a database error other than a full disk).

        The outputs it holds go safe and its leases are released before anything else. Then, from
        what is committed, it is recorded ``FAILED`` at the step that ran (``COMPENSATION_FAILED``
        with the compensations still due, during a rollback) with an ``internal_error`` alert, so
        ``retry`` runs it on. If even that cannot be committed, the status in memory still lets
        ``retry`` act, and recovery resumes it after a restart."""
        error = f"internal error: {type(exc).__name__}: {exc}"
        log.error("workflow %s (%s): %s", self.id, self.workflow_type, error, exc_info=exc)
        committed = self._progress
        change = saga.internal_error(committed, error)
        self._progress = change.progress  # terminal now, in memory
        self._fresh = False
        self._builder._begun.pop(self.id, None)
        self._let_go()
        try:
            self._restore_state()  # the committed state: what the failed step did is not kept
        except Exception:
            log.exception("workflow %s: cannot restore the committed state", self.id)
        try:
            rec = await self.store.load_instance(self.id)
            if rec is not None:
                committed = saga.Progress.from_json(rec.progress)
                change = saga.internal_error(committed, error)
                self._progress = change.progress
        except Exception:
            log.exception("workflow %s: cannot read back what is committed", self.id)
        now = time.time()
        pending = _Pending()
        # Their "started" records are committed; their outcomes never will be.
        for fl in (
            *(() if committed.inflight is None else (committed.inflight,)),
            *committed.running,
        ):
            pending.journal.append(JournalEnd(fl.seq, "failed", now, error))
        alert = self._apply(pending, change, now)
        try:
            await self.store.commit(self._transition(pending, now))
        except Exception:
            log.exception(
                "workflow %s: cannot record the internal error; it stays %s in memory (retry acts "
                "on it) and as last committed in the database (a restart resumes it)",
                self.id,
                self.status.value,
            )
            try:
                if alert is not None:
                    await self.store.add_alert(alert, workflow_id=self.id)
            except Exception:
                log.exception("workflow %s: cannot queue the internal_error alert", self.id)

    def _restore_state(self) -> None:
        self.state = type(self.state).model_validate_json(self._state_json)

    # -- journal and events ----------------------------------------------------------------------------
    def _event(
        self,
        pending: _Pending,
        name: str,
        at: float,
        *,
        step: str | None = None,
        attempt: int | None = None,
        error: str | None = None,
    ) -> None:
        pending.events.append(
            (
                "event",
                {
                    "seq": None,
                    "at": iso(at),
                    "workflow_id": self.id,
                    "workflow_type": self.workflow_type,
                    "event": name,
                    "step": step,
                    "attempt": attempt,
                    "status": self.status.value,
                    "error": error,
                },
            )
        )
        for observer in self._builder.observers:
            try:
                observer(self, pending.events[-1][1])
            except Exception:
                log.exception("workflow observer %r failed", observer)
        if log.isEnabledFor(logging.INFO):
            log.info(
                "workflow %s %s %s%s%s",
                self.id,
                name,
                f"step={step} " if step else "",
                f"attempt={attempt} " if attempt else "",
                f"status={self.status.value}" + (f" error={error}" if error else ""),
            )

    def _apply(self, pending: _Pending, change: saga.Change, at: float) -> dict[str, Any] | None:
        """Take the state machine's change: its progress, and its events and alert into
        ``pending`` for the next commit. Returns the alert's payload, if there is one."""
        self._progress = change.progress
        if self._plan.stamps and any(
            e.name == "step_completed" and e.step not in self._plan.branch_of for e in change.events
        ):
            stamp = _clock.Stamp(*_clock.read_clock(self._builder.clock))
            self._progress = saga.stamped(self._progress, stamp)
        for e in change.events:
            self._event(pending, e.name, at, step=e.step, attempt=e.attempt, error=e.error)
        return None if change.alert is None else self._alert(pending, at, change.alert)

    def _alert(self, pending: _Pending, at: float, alert: saga.Alert) -> dict[str, Any]:
        step, error = alert.step, alert.error
        if alert.kind == "failed_after_pivot":
            message = (
                f"Step {step!r} of workflow {self.id} ({self.workflow_type}) failed after the "
                f"pivot {self._plan.pivot!r} completed: {error}. Nothing was rolled back (the "
                f"pivot is the point of no return) and it is FAILED; fix the cause, then "
                f"`edgesaga retry {self.id}` resumes from the failed step."
            )
            log.error(message)
        elif alert.kind == "compensation_failed":
            message = (
                f"Compensation of step {step!r} of workflow {self.id} ({self.workflow_type}) "
                f"failed after its retries: {error}. The rollback went on with the others; undo "
                "this step by hand, then `edgesaga retry` the workflow or leave it "
                "COMPENSATION_FAILED."
            )
            log.error(message)
        else:
            where = f" at step {step!r}" if step else ""
            message = (
                f"Workflow {self.id} ({self.workflow_type}) stopped{where} on an {error}. Its "
                f"outputs were set to their safe values and it is {self.status.value}; the agent "
                f"log has the traceback. Fix the cause, then `edgesaga retry {self.id}`."
            )
        payload = make_alert(
            alert.kind,
            message,
            at=iso(at),
            workflow_id=self.id,
            workflow_type=self.workflow_type,
            step=step,
            error=error,
        )
        written = dict(payload)
        pending.events.append(("alert", written))
        return written

    def _transition(self, pending: _Pending, at: float) -> Transition:
        built, self._json_of = self._json_of, None
        state_json = built[1] if built is not None and built[0] is self.state else None
        if state_json is None:
            state_json = self.state.model_dump_json()
        return Transition(
            workflow_id=self.id,
            status=self.status,
            current_step=self.current_step,
            error=self.error,
            state_json=state_json,
            progress_json=dumps(self._progress.to_json()),
            at=at,
            journal=pending.journal,
            events=pending.events,
        )

    async def _commit_change(self, change: saga.Change, *, settle: bool = True) -> None:
        """Apply one transition of the state machine and commit it on its own; with ``settle``, a
        terminal status then lets go of what the workflow holds."""
        now = time.time()
        pending = _Pending()
        self._apply(pending, change, now)
        await self._commit(pending, now)
        if settle and self.status.is_terminal:
            self._on_terminal()

    async def _commit(self, pending: _Pending, at: float) -> None:
        tr = self._transition(pending, at)
        delay = 0.5
        stalled: float | None = None  # time.monotonic() of the first full-disk failure
        made_safe = False
        while True:
            try:
                await self.store.commit(tr)
                break
            except DiskFull as exc:
                # Nothing was written; the in-memory transition waits for space, then commits.
                now = time.monotonic()
                stalled = now if stalled is None else stalled
                grace = self.store.disk_full_grace
                if not made_safe and now - stalled >= grace:
                    made_safe = True
                    self._disk_full_safe(now - stalled)
                wait = delay if made_safe else min(delay, max(0.0, stalled + grace - now))
                log.error("workflow %s: %s Retrying in %.1f s.", self.id, exc, wait)
                await asyncio.sleep(wait)
                delay = min(delay * 2, 5.0)
        if stalled is not None:
            log.warning("workflow %s: committed after the disk had space again; going on", self.id)
        self._state_json = tr.state_json
        pending.journal = []
        pending.events = []
        if self.status.is_terminal:
            self._finished.set()

    def _disk_full_safe(self, stalled_for: float) -> None:
        """A commit has waited ``stalled_for`` s for a full disk: the devices this workflow holds go
        to their safe values (it keeps its leases, and goes on as after a restart once it commits)."""
        resources = sorted(self._builder.leases.held_by(self.id))
        hw = self._builder.hardware
        if not resources or hw is None:
            return
        try:
            hw.safe_state(resources)
        except Exception:
            log.exception(
                "workflow %s: could not drive %s to their safe values", self.id, resources
            )
            return
        log.error(
            "workflow %s: the disk has been full for %.0f s; %s set to their safe values while "
            "its commit waits for space",
            self.id,
            stalled_for,
            ", ".join(resources),
        )


class WorkflowBuilder:
    """Loads workflow definitions and creates, loads, recovers and cancels instances.

    ``definitions`` are YAML files or directories (searched recursively); everything is validated
    and every dotted path imported here, so a typo fails now, not at 3 a.m. ``hardware`` is the HAL
    board handed to steps as ``context.hardware``.
    """

    #: PAUSED workflows read per query by :meth:`rearm_pauses` at start-up.
    paused_page = 500

    def __init__(
        self,
        definitions: Iterable[str | Path] = (),
        *,
        hardware: Any = None,
        max_state_bytes: int | None = DEFAULT_MAX_STATE_BYTES,
        clock: _clock.Clock | None = None,
    ) -> None:
        self.hardware = hardware
        #: Limit of a workflow's state as UTF-8 JSON (None: no limit). Initial data beyond it is
        #: refused; a step result beyond it fails the step.
        self.max_state_bytes = max_state_bytes
        #: Callables ``observer(workflow, event)`` called (on the loop) for every event as it is
        #: recorded, before it commits; for printing and metrics, not for side effects.
        self.observers: list[Any] = []
        self.leases = LeaseManager()
        self._threads = DaemonPool()
        self._definitions: dict[str, LoadedDefinition] = {}
        self._by_hash: dict[str, LoadedDefinition] = {}
        self._plans: dict[str, saga.Plan] = {}
        self._live: weakref.WeakValueDictionary[str, Workflow] = weakref.WeakValueDictionary()
        # Workflows whose first attempt was begun with the instance and has not run: held until it
        # runs, so a caller that drops one and loads it again gets this object, which knows the
        # attempt has not run (rebuilt from the store, it would look cut short by a crash).
        self._begun: dict[str, Workflow] = {}
        #: Called with a workflow id when a PAUSED step's timeout passes (the agent expires and
        #: submits it to its runner); None: the builder applies ``expire_pause`` and drives the
        #: workflow itself.
        self.on_pause_timeout: Callable[[str], Any] | None = None
        # PAUSED workflows this builder knows: id -> (paused at, approve_with device or None).
        self._paused: dict[str, tuple[float, str | None]] = {}
        self._pause_timers: dict[str, asyncio.TimerHandle] = {}
        self._expiring: set[asyncio.Task[Any]] = set()
        #: The timer service that wakes workflows waiting in a DELAY (see start_timers); None:
        #: a DELAY waits in the coroutine that drives it (the CLI without an agent).
        self.timers: TimerService | None = None
        self.use_clock(_clock.SystemClock() if clock is None else clock)
        for path in discover(definitions):
            self.add_definition(load_definition(path))

    # -- time ----------------------------------------------------------------------------------
    def use_clock(self, clock: _clock.Clock) -> None:
        """Read time from ``clock``; this agent run begins now by it (a timer mark seen before
        is rebased onto the run when its workflow is first driven)."""
        self.clock = clock
        self._run_started = (clock.boot_id(), clock.boottime())

    def needs_rebase(self, mark: _clock.TimerMark, reading: _clock.ClockReading) -> bool:
        """Whether ``mark`` was last seen by an earlier agent run (or boot) than this one."""
        boot, started = self._run_started
        return mark.boot_id != reading.boot_id or (boot == mark.boot_id and mark.since < started)

    async def start_timers(
        self,
        store: SQLiteStore,
        submit: Callable[[Workflow], Any],
        clock: _clock.Clock | None = None,
    ) -> TimerService:
        """Start the timer service (``self.timers``): workflows waiting in a DELAY are parked
        there and, once due, loaded from ``store`` and given to ``submit`` (the runner's)."""
        if clock is not None:
            self.use_clock(clock)
        if self.timers is None:
            self.timers = TimerService(self, store, self.clock, submit)
            self.timers.start()
        return self.timers

    async def stop_timers(self) -> None:
        """Stop the timer service; the waiting workflows stay waiting in the store."""
        timers, self.timers = self.timers, None
        if timers is not None:
            await timers.stop()

    def add_definition(self, definition: LoadedDefinition) -> None:
        """Register an already loaded definition."""
        known = self._definitions.get(definition.workflow_type)
        if known is not None and known.hash != definition.hash:
            raise DefinitionError(
                f"workflow type {definition.workflow_type!r} is also defined in {known.source}; "
                "each type must be defined once.",
                path=definition.source,
            )
        self._definitions[definition.workflow_type] = definition
        self._by_hash[definition.hash] = definition

    @property
    def workflow_types(self) -> list[str]:
        """The loaded workflow types, sorted."""
        return sorted(self._definitions)

    def definition(self, workflow_type: str) -> LoadedDefinition:
        try:
            return self._definitions[workflow_type]
        except KeyError:
            raise UnknownWorkflowType(workflow_type, list(self._definitions)) from None

    def _plan_for(self, definition: LoadedDefinition) -> saga.Plan:
        plan = self._plans.get(definition.hash)
        if plan is None:
            plan = self._plans[definition.hash] = _plan(definition)
        return plan

    def live(self, workflow_id: str) -> Workflow | None:
        """The in-memory workflow object for ``workflow_id`` if this builder has one."""
        return self._live.get(workflow_id)

    def rebuild(self, rec: InstanceRecord, store: SQLiteStore) -> Workflow:
        """The workflow rebuilt from its stored record, held from now on as this builder's one
        object for its id (in place of any other). Raises what the record's definition or state
        fails with (a step module removed, say); nothing is held then."""
        wf = self._from_record(rec, store)
        self._live[rec.id] = wf
        return wf

    def release(self, wf: Workflow) -> None:
        """No longer hold ``wf`` as the object for its id, if it still is the one held."""
        if self._live.get(wf.id) is wf:
            del self._live[wf.id]

    def known_plan(self, definition_hash: str) -> tuple[LoadedDefinition, saga.Plan] | None:
        """The loaded (or already rebuilt) definition with ``definition_hash`` and its plan, or
        None when this builder has none with it."""
        definition = self._by_hash.get(definition_hash)
        return None if definition is None else (definition, self._plan_for(definition))

    def validate_data(self, workflow_type: str, initial_data: dict[str, Any] | None) -> BaseModel:
        """Build the initial state; raise :class:`InvalidData` with a readable sentence."""
        return self._initial_state(workflow_type, initial_data)[0]

    def _initial_state(
        self, workflow_type: str, initial_data: dict[str, Any] | None
    ) -> tuple[BaseModel, str]:
        """The initial state and its JSON: unknown fields refused as in a step result (unless
        the model allows extras), and the size bounded by ``max_state_bytes``."""
        model = self.definition(workflow_type).state_model
        data = initial_data or {}
        unknown = unknown_fields(model, data)
        if unknown:
            raise InvalidData(
                f"Initial data has field(s) {unknown} that {model.__name__} does not have; add "
                "them to the state model or leave them out.",
                workflow_type=workflow_type,
            )
        try:
            state = model.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '(data)'}: {e['msg']}"
                for e in exc.errors()[:5]
            )
            raise InvalidData(
                f"Initial data does not fit {model.__name__}: {problems}.",
                workflow_type=workflow_type,
            ) from None
        state_json = state.model_dump_json()
        size = oversize(state_json, self.max_state_bytes)
        if size is not None:
            raise InvalidData(
                f"The initial data is {size_text(size)} of JSON; the limit is "
                f"{size_text(self.max_state_bytes or 0)} (max_state_bytes). Send less, or raise "
                "max_state_bytes in the agent config.",
                workflow_type=workflow_type,
            )
        return state, state_json

    async def create_workflow(
        self,
        workflow_type: str,
        initial_data: dict[str, Any] | None = None,
        *,
        store: SQLiteStore,
        workflow_id: str | None = None,
        saga_mode: bool | None = None,
        request: tuple[str, dict[str, Any]] | None = None,
        begin: bool | None = None,
    ) -> Workflow:
        """Create and persist a new instance; it is committed before this returns.

        A ``workflow_id`` that already exists returns the existing workflow (idempotent start).
        ``saga_mode`` overrides the definition's ``saga_mode``. ``request`` is a
        ``(request_id, reply)`` pair stored in the same transaction (command dedupe).

        The first step's "started" record commits with the instance row (``begin``; by default
        unless the definition leases resources, whose wait comes first), so driving the workflow
        next costs one commit per step, as :meth:`start_workflow` does. One that is cancelled
        before it runs ends ``CANCELLED`` without running that step; after a crash before it ran,
        recovery counts the attempt as interrupted, as it does for every attempt cut short.
        """
        definition = self.definition(workflow_type)
        if workflow_id is not None:
            existing = self._live.get(workflow_id)
            if existing is not None and existing.store is store:
                return existing
        state, state_json = self._initial_state(workflow_type, initial_data)
        wid = workflow_id or new_workflow_id()
        saga_on = definition.spec.saga_mode if saga_mode is None else saga_mode
        started = saga.start(self._plan_for(definition), saga=saga_on)
        progress = started.progress
        now = time.time()
        wf = Workflow(
            builder=self,
            definition=definition,
            store=store,
            workflow_id=wid,
            state=state,
            progress=progress,
            created_at=now,
            state_json=state_json,
        )
        pending = _Pending()
        wf._apply(pending, started, now)
        if begin is None:
            begin = not definition.spec.resources  # a lease wait comes before the first step
        if begin and not isinstance(saga.next_action(progress, wf._plan), saga.Run):
            begin = False  # a HUMAN_INPUT or PARALLEL first step: nothing runs as one attempt
        if begin:
            wf._begin(pending, progress.next_step or "", "forward", now)
            wf._fresh = True
        tr = wf._transition(pending, now)
        if request is not None:
            request = (request[0], {**request[1], "workflow_id": wid})
        created = await store.create_instance(
            NewInstance(
                id=wid,
                workflow_type=workflow_type,
                workflow_version=definition.version,
                definition_hash=definition.hash,
                definition=definition.snapshot,
                first=tr,
                request=request,
            )
        )
        if not created:
            return await self.load_workflow(wid, store)
        self._live[wid] = wf
        if wf._fresh:
            self._begun[wid] = wf
        return wf

    async def start_workflow(
        self,
        workflow_type: str,
        initial_data: dict[str, Any] | None = None,
        *,
        store: SQLiteStore,
        workflow_id: str | None = None,
        saga_mode: bool | None = None,
    ) -> Workflow:
        """Create an instance and run it to a terminal status: one commit per step plus one (the
        first step's "started" record commits with the instance row)."""
        wf = await self.create_workflow(
            workflow_type, initial_data, store=store, workflow_id=workflow_id, saga_mode=saga_mode
        )
        await wf.run()
        return wf

    async def load_workflow(self, workflow_id: str, store: SQLiteStore) -> Workflow:
        """Load an instance from the store (the live object when this builder has one)."""
        live = self._live.get(workflow_id)
        if live is not None and live.store is store:
            return live
        rec = await store.load_instance(workflow_id)
        if rec is None:
            raise WorkflowNotFound(workflow_id)
        # Recovery's feeder may have built it while the store was read: one object per workflow.
        live = self._live.get(workflow_id)
        if live is not None and live.store is store:
            return live
        wf = self._from_record(rec, store)
        self._live[workflow_id] = wf
        return wf

    def _from_record(self, rec: InstanceRecord, store: SQLiteStore) -> Workflow:
        definition = self._by_hash.get(rec.definition_hash)
        if definition is None:
            assert rec.definition is not None
            definition = build_definition(
                json.loads(rec.definition),
                source=f"<definition stored with workflow {rec.id}, {rec.workflow_type}>",
            )
            self._by_hash[definition.hash] = definition
        state = definition.state_model.model_validate(rec.state)
        return Workflow(
            builder=self,
            definition=definition,
            store=store,
            workflow_id=rec.id,
            state=state,
            progress=saga.Progress.from_json(rec.progress),
            created_at=rec.created_at,
        )

    # -- HUMAN_INPUT ---------------------------------------------------------------------------
    async def resume(
        self, store: SQLiteStore, workflow_id: str, data: dict[str, Any] | None = None
    ) -> Workflow:
        """Resume a PAUSED workflow with ``data`` (see :meth:`Workflow.resume`); the returned
        workflow is ACTIVE and ready to be driven (``run()``, or a runner's ``submit``). Raises
        :class:`WorkflowNotFound`, :class:`InvalidTransition` or :class:`InvalidInput`."""
        wf = await self.load_workflow(workflow_id, store)
        return await wf.resume(data)

    async def expire_pause(self, store: SQLiteStore, workflow_id: str) -> Workflow | None:
        """Apply a PAUSED workflow's ``on_timeout`` (see :meth:`Workflow.expire_pause`); returns
        the workflow when it is to be driven on (ACTIVE or COMPENSATING), else None."""
        wf = await self.load_workflow(workflow_id, store)
        if not await wf.expire_pause():
            return None
        return wf if wf.status in RESUMABLE else None

    def waiting_input(self, workflow: Workflow) -> dict[str, Any] | None:
        """What a PAUSED workflow waits for (see :attr:`Workflow.waiting_input`)."""
        return workflow.waiting_input

    def paused_waiting_on(self, device: str) -> list[str]:
        """The PAUSED workflows whose step has ``approve_with: device``, oldest pause first."""
        found = [(at, wid) for wid, (at, dev) in self._paused.items() if dev == device]
        return [wid for _, wid in sorted(found)]

    async def rearm_pauses(self, store: SQLiteStore) -> list[Workflow]:
        """At start: note every PAUSED workflow (for :meth:`paused_waiting_on`), re-take the
        device leases it held, and re-arm each step timeout: its durable timer is rebased onto
        this run (committed) and waits what it has left by the clock rules (a pause stored
        without one waits its full timeout again). The PAUSED ones are read a page at a time,
        however many there are."""
        out = []
        cursor: str | None = None
        while True:
            records, cursor = await store.list_page(
                status=WorkflowStatus.PAUSED.value, limit=self.paused_page, cursor=cursor
            )
            for rec in records:
                wf = await self._rearm_pause(rec, store)
                if wf is not None:
                    out.append(wf)
            if cursor is None:
                return out

    async def _rearm_pause(self, rec: InstanceRecord, store: SQLiteStore) -> Workflow | None:
        try:
            wf = await self.load_workflow(rec.id, store)
        except Exception:
            log.exception("workflow %s: cannot load the PAUSED workflow", rec.id)
            return None
        resources = wf.definition.spec.resources
        if resources and all(self.leases.holder(n) in (None, wf.id) for n in resources):
            await self.leases.acquire(wf.id, resources)
        elif resources:
            log.warning(
                "workflow %s is PAUSED but %s is held by another workflow", wf.id, resources
            )
        await wf.rebase_pause_timer()
        self._arm_pause(wf, at=rec.updated_at)
        return wf

    def _arm_pause(self, wf: Workflow, *, at: float | None = None) -> None:
        """Note a PAUSED workflow and arm its step's timeout (a plain loop timer)."""
        step = wf.definition.step(wf.progress.next_step or "")
        self._paused[wf.id] = (time.time() if at is None else at, step.spec.approve_with)
        self._disarm_timer(wf.id)
        timeout = step.spec.timeout
        if timeout is None:
            return
        mark = wf.progress.timer
        if mark is not None:
            timeout = self._pause_wait(mark)
        if self.timers is not None:
            self.timers.watch(wf.id, timeout)
            return
        loop = asyncio.get_running_loop()
        self._pause_timers[wf.id] = loop.call_later(timeout, self._pause_due, wf.id, wf.store)

    def _pause_wait(self, mark: _clock.TimerMark) -> float:
        """Seconds a pause's timeout has left by its mark (0: due now, or late)."""
        reading = _clock.read_clock(self.clock)
        if mark.boot_id != reading.boot_id:
            mark = _clock.rebase(mark, reading)  # not yet committed: wait what it has left
        decision = _clock.decide(mark, reading)
        return decision.seconds if isinstance(decision, _clock.Wait) else 0.0

    def pause_timer_fired(self, wf: Workflow) -> None:
        """The timer service's wake-up for a PAUSED workflow: expire it if its timeout is due
        by the clock rules, else watch it again for what is left."""
        mark = wf.progress.timer
        wait = 0.0 if mark is None else self._pause_wait(mark)
        if wait > 0 and self.timers is not None:
            self.timers.watch(wf.id, wait)
            return
        self._pause_due(wf.id, wf.store)

    def _disarm_pause(self, workflow_id: str) -> None:
        self._paused.pop(workflow_id, None)
        self._disarm_timer(workflow_id)

    def _disarm_timer(self, workflow_id: str) -> None:
        if self.timers is not None:
            self.timers.forget(workflow_id)
        timer = self._pause_timers.pop(workflow_id, None)
        if timer is not None:
            timer.cancel()

    def _pause_due(self, workflow_id: str, store: SQLiteStore) -> None:
        self._pause_timers.pop(workflow_id, None)
        if self.on_pause_timeout is not None:
            self.on_pause_timeout(workflow_id)
            return
        task = asyncio.ensure_future(self._expire_and_run(store, workflow_id))
        self._expiring.add(task)
        task.add_done_callback(self._expiring.discard)

    async def _expire_and_run(self, store: SQLiteStore, workflow_id: str) -> None:
        try:
            wf = await self.expire_pause(store, workflow_id)
            if wf is not None:
                await wf.run()
        except Exception:
            log.exception("workflow %s: the pause timeout could not be applied", workflow_id)

    async def recover(self, store: SQLiteStore, *, run: bool = True) -> list[Workflow]:
        """Resume every ``ACTIVE`` and ``COMPENSATING`` instance (see :func:`agent._recovery.recover`)."""
        return await _recovery.recover(self, store, run=run)

    async def cancel(
        self, workflow_id: str, store: SQLiteStore, *, reason: str = "cancelled on request"
    ) -> Workflow:
        """Cancel a workflow (see :meth:`Workflow.cancel`) and return it."""
        wf = await self.load_workflow(workflow_id, store)
        await wf.cancel(reason)
        return wf

    async def retry(self, workflow_id: str, store: SQLiteStore) -> Workflow:
        """Retry a FAILED or COMPENSATION_FAILED workflow (see :meth:`Workflow.retry`)."""
        wf = await self.load_workflow(workflow_id, store)
        await wf.retry()
        return wf
