"""Running one step: its context, the call (an async step started at once, a sync one on a
thread), its timeout and cancel, and the checks of what it returned."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import types
from collections.abc import Coroutine, Generator
from typing import TYPE_CHECKING, Any, NamedTuple

from pydantic import BaseModel, ValidationError

from agent import _saga as saga
from agent._context import StepContext
from agent._definition import LoadedStep
from agent._errors import InvalidData, StepTimeout

if TYPE_CHECKING:
    from agent._engine import Workflow

log = logging.getLogger("edgesaga.workflow")

step_is_async = functools.cache(inspect.iscoroutinefunction)


# ------------------------------------------------------------------------------------------------
# The eager start of async steps


class Finished(NamedTuple):
    """An async step that returned without waiting, and what it returned."""

    value: Any


def start_eagerly(coro: Coroutine[Any, Any, Any]) -> Finished | asyncio.Task[Any]:
    """Run an async step's first part now, inline, as an eager task would; raises what it raises.

    Why: most steps (a GPIO write, a no-op) finish without waiting, and then need no task and no
    trip round the event loop, a good share of what a step costs on a small board. A step that
    does wait goes on in a task that drives the same coroutine on from where it stopped.

    Python 3.11 has no eager tasks, so this is done by hand, and the hand-driven coroutine needs
    ``_resume``/``_finish`` to go on and ``_deliver_missed_cancel`` for a cancel that reaches its
    task before the task's first step. Python 3.12's ``asyncio.Task(coro, loop=loop,
    eager_start=True)`` (what ``asyncio.eager_task_factory`` builds) does the same in one task:
    done already when the step did not wait, and a cancel always reaches the step. With 3.12 as
    the oldest Python supported, those three helpers, :class:`Finished` and ``request_cancel``'s
    deferred ``call_soon(task.cancel)`` could go; Raspberry Pi OS Bookworm ships 3.11, so this
    path stays.
    """
    try:
        waiting_on = coro.send(None)
    except StopIteration as finished:
        return Finished(finished.value)
    return asyncio.get_running_loop().create_task(_finish(coro, waiting_on))


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Any], waiting_on: Any) -> Generator[Any, Any, Any]:
    """Go on driving a coroutine whose first ``send(None)`` already ran and yielded
    ``waiting_on``, as its own task would have: what it yields goes up to the task that drives
    this, and what that task sends or throws goes down to it (``yield from``, after the start)."""
    while True:
        try:
            sent = yield waiting_on
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # a cancel or timeout, delivered to the step
            try:
                waiting_on = coro.throw(exc)
            except StopIteration as finished:
                return finished.value
        else:
            try:
                waiting_on = coro.send(sent)
            except StopIteration as finished:
                return finished.value


async def _finish(coro: Coroutine[Any, Any, Any], waiting_on: Any) -> Any:
    return await _resume(coro, waiting_on)


_CLEANING_UP: set[asyncio.Task[Any]] = set()  # steps finishing their clean-up after a missed cancel


def _deliver_missed_cancel(coro: Coroutine[Any, Any, Any]) -> None:
    """Throw the CancelledError into a step whose task was cancelled before its first step.

    Such a task never runs ``_finish``, so the step, suspended after its inline first part, would
    never see the cancel and its clean-up would not run. A step the cancel did reach has finished
    (it re-raised, or returned) by the time its task is done, and is left alone. A step that
    awaits something during its clean-up finishes it in a task of its own."""
    if inspect.getcoroutinestate(coro) != inspect.CORO_SUSPENDED:
        return
    try:
        waiting_on = coro.throw(asyncio.CancelledError())
    except (StopIteration, Exception, asyncio.CancelledError):
        return  # it handled the cancel (or failed while doing so); nothing is waiting for it
    task = asyncio.get_running_loop().create_task(_finish(coro, waiting_on))
    _CLEANING_UP.add(task)
    task.add_done_callback(_CLEANING_UP.discard)


# ------------------------------------------------------------------------------------------------
# Running one step


@functools.cache
def _step_logger(workflow_type: str, step: str) -> logging.Logger:
    return logging.getLogger(f"edgesaga.step.{workflow_type}.{step}")


def size_text(n: int) -> str:
    """``1 MiB``, ``2.4 MiB``, ``2 KiB``, ``900 bytes``."""
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n // size} {unit}" if n % size == 0 else f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def oversize(state_json: str, limit: int | None) -> int | None:
    """The UTF-8 size of ``state_json`` when it is over ``limit``, else None (cheap: an ASCII
    text, the usual state, is measured by its length without encoding it)."""
    if limit is None or len(state_json) <= limit // 4:
        return None
    size = len(state_json) if state_json.isascii() else len(state_json.encode())
    return size if size > limit else None


@functools.cache
def _field_names(model: type[BaseModel]) -> frozenset[str]:
    names = set(model.model_fields)
    for field in model.model_fields.values():
        names.update(a for a in (field.alias, field.validation_alias) if isinstance(a, str))
    return frozenset(names)


def unknown_fields(model: type[BaseModel], data: Any) -> list[str]:
    """Keys of ``data`` that are no field of ``model`` (none when the model allows extras)."""
    if not isinstance(data, dict) or model.model_config.get("extra") == "allow":
        return []
    known = _field_names(model)
    return sorted(str(k) for k in data if k not in known)


class Outcome(NamedTuple):
    ok: bool
    state: BaseModel | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    cancelled: bool = False
    route: str | None = None  # what a DECISION returned (None: its default)


async def execute(wf: Workflow, step: LoadedStep, fl: saga.Inflight) -> Outcome:
    """Run the attempt ``fl`` of ``step`` (or of its compensation) for ``wf``, within the step's
    timeout; a failure, a timeout, a cancel and a result that does not fit the state model are
    outcomes, not exceptions. On any failure ``wf.state`` is back at its committed value."""
    compensating = fl.phase == "compensate"
    func = step.compensate if compensating else step.function
    assert func is not None
    params = step.spec.params
    key = f"{wf.id}:{step.name}" + (":compensate" if compensating else "")
    ctx = StepContext(
        workflow_id=wf.id,
        workflow_type=wf.workflow_type,
        step_name=step.name,
        attempt=fl.attempt,
        idempotency_key=key,
        params=dict(params),
        hardware=wf._builder.hardware,
        compensating=compensating,
        logger=_step_logger(wf.workflow_type, step.name),
        outputs=wf._step_outputs,
    )
    state = wf.state  # the step may change it in place; a failure restores the committed copy
    timeout = step.spec.timeout
    task: asyncio.Future[Any]
    coro = None
    if step_is_async(func):
        coro = func(state, ctx, **params)
        try:
            started = start_eagerly(coro)
        except Exception as exc:
            wf._restore_state()
            return Outcome(False, error=f"{type(exc).__name__}: {exc}")
        if isinstance(started, Finished):
            return _outcome(wf, state, started.value, step)
        task = started
        # Only an async forward step can be stopped by a cancel (see cancel()).
        wf._step_task = None if compensating else task
    else:
        task = wf._builder._threads.run(functools.partial(func, state, ctx, **params))
        wf._step_task = None
    deadline = None if timeout is None else asyncio.timeout(timeout)
    try:
        if deadline is None:
            result = await task
        else:
            async with deadline:
                result = await task
    except TimeoutError as exc:
        wf._restore_state()
        if deadline is None or not deadline.expired():
            # The step's own TimeoutError (e.g. a device that never answered), not ours.
            return Outcome(False, error=f"{type(exc).__name__}: {exc}")
        if not isinstance(task, asyncio.Task):
            log.warning(
                "workflow %s: sync step %s outlived its timeout; its thread cannot be stopped, "
                "so whatever it returns later is discarded",
                wf.id,
                step.name,
            )
        return Outcome(False, error=str(StepTimeout(wf.id, step.name, timeout or 0)))
    except asyncio.CancelledError:
        me = asyncio.current_task()
        if task.cancelled() and wf._cancel.is_set() and me is not None and not me.cancelling():
            wf._restore_state()  # stopped by cancel(): the step may have taken effect
            return Outcome(False, cancelled=True, error=wf._cancel_reason)
        task.cancel()
        if coro is not None and task.done():
            _deliver_missed_cancel(coro)
        raise
    except Exception as exc:
        wf._restore_state()
        return Outcome(False, error=f"{type(exc).__name__}: {exc}")
    finally:
        wf._step_task = None
    return _outcome(wf, state, result, step)


def _outcome(wf: Workflow, state: BaseModel, result: Any, step: LoadedStep) -> Outcome:
    if step.spec.type == "DECISION":  # it takes no compensate_function
        if result is not None and not isinstance(result, str):
            wf._restore_state()
            return Outcome(
                False,
                error=(
                    f"DECISION step {step.name!r} returned {type(result).__name__}; a DECISION "
                    "returns a route key (str), or None for its default."
                ),
            )
        return Outcome(True, state=state, route=result)
    try:
        new_state = _merge(state, result, step)
        state_json = new_state.model_dump_json()
        limit = wf._builder.max_state_bytes
        size = oversize(state_json, limit)
        if size is not None:
            raise InvalidData(
                f"Step {step.name!r} returned a state of {size_text(size)} of JSON; the "
                f"limit is {size_text(limit or 0)} (max_state_bytes). Keep large data out of "
                "the state (in a file, say, with its path in the state) or raise "
                "max_state_bytes in the agent config."
            )
    except InvalidData as err:
        wf._restore_state()
        return Outcome(False, error=str(err))
    wf._json_of = (new_state, state_json)
    return Outcome(True, state=new_state, result=result)


def _merge(state: BaseModel, result: Any, step: LoadedStep) -> BaseModel:
    model = type(state)
    if result is None:
        result = {}
    if not isinstance(result, dict):
        raise InvalidData(
            f"Step {step.name!r} returned {type(result).__name__}; a step returns a dict of "
            "state fields to update, or None."
        )
    data = state.model_dump()
    if result:
        unknown = unknown_fields(model, result)
        if unknown:
            raise InvalidData(
                f"Step {step.name!r} returned field(s) {unknown} that {model.__name__} does "
                "not have; add them to the state model or stop returning them."
            )
        data.update(result)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidData(
            f"Step {step.name!r} left the state invalid: {where}: {first['msg']}."
        ) from None


class BranchOutcome(NamedTuple):
    """A branch step's attempt: its outcome (``state`` not merged yet) and what it commanded."""

    outcome: Outcome
    result: Any = None
    outputs: dict[str, Any] | None = None


async def execute_branch(wf: Workflow, step: LoadedStep, fl: saga.Inflight) -> BranchOutcome:
    """Run the attempt ``fl`` of a PARALLEL's branch step, as a task beside the other branches'.

    The step gets a copy of the state: what it returns is merged into the workflow's state when
    the drive loop records it, in completion order (in-place changes of a branch step are not
    kept). A cancel of this task (another branch failed, or the workflow is cancelled) ends it
    at its next ``await`` as a cancelled outcome: it may have taken effect."""
    func = step.function
    assert func is not None
    params = step.spec.params
    outputs: dict[str, Any] = {}
    ctx = StepContext(
        workflow_id=wf.id,
        workflow_type=wf.workflow_type,
        step_name=step.name,
        attempt=fl.attempt,
        idempotency_key=f"{wf.id}:{step.name}",
        params=dict(params),
        hardware=wf._builder.hardware,
        compensating=False,
        logger=_step_logger(wf.workflow_type, step.name),
        outputs=outputs,
    )
    state = wf.state.model_copy(deep=True)
    timeout = step.spec.timeout
    deadline = asyncio.timeout(timeout)
    try:
        async with deadline:
            if step_is_async(func):
                result = await func(state, ctx, **params)
            else:
                call = functools.partial(func, state, ctx, **params)
                result = await wf._builder._threads.run(call)
    except TimeoutError as exc:
        if timeout is not None and deadline.expired():
            return BranchOutcome(Outcome(False, error=str(StepTimeout(wf.id, step.name, timeout))))
        return BranchOutcome(Outcome(False, error=f"{type(exc).__name__}: {exc}"))
    except asyncio.CancelledError:
        return BranchOutcome(Outcome(False, cancelled=True, error=wf._branch_stop_reason))
    except Exception as exc:
        return BranchOutcome(Outcome(False, error=f"{type(exc).__name__}: {exc}"))
    return BranchOutcome(Outcome(True), result, outputs)


def merge_branch(wf: Workflow, step: LoadedStep, result: Any) -> Outcome:
    """A branch step's result merged into the workflow's state as it is now."""
    return _outcome(wf, wf.state, result, step)
