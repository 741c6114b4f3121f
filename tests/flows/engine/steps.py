"""Step functions for the engine tests.

Every call is recorded in :data:`CALLS` under the workflow id (ids are unique per test), so a test can
see which steps ran, with which attempt number, idempotency key and thread, even when the step failed
and its in-place state changes were thrown away.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent import SQLiteStore, StepContext
from tests.flows.engine.models import EngineState


@dataclass(frozen=True)
class Call:
    """One execution of a step or compensation."""

    what: str  # step name, "undo:<step>" for a compensation, or a marker like "late-done:<step>"
    attempt: int
    key: str
    thread: int


CALLS: defaultdict[str, list[Call]] = defaultdict(list)


def _called(context: StepContext, what: str | None = None) -> None:
    name = what or (f"undo:{context.step_name}" if context.compensating else context.step_name)
    CALLS[context.workflow_id].append(
        Call(name, context.attempt, context.idempotency_key, threading.get_ident())
    )


def names(workflow_id: str) -> list[str]:
    """The recorded calls of one workflow, by name."""
    return [c.what for c in CALLS[workflow_id]]


# -- plain steps ---------------------------------------------------------------------------------


def record(state: EngineState, context: StepContext, **params: Any) -> dict[str, Any]:
    _called(context)
    return {"log": [*state.log, context.step_name], "thread_id": threading.get_ident()}


async def record_async(state: EngineState, context: StepContext, **params: Any) -> dict[str, Any]:
    _called(context)
    await asyncio.sleep(0)
    return {"log": [*state.log, context.step_name], "thread_id": threading.get_ident()}


def undo(state: EngineState, context: StepContext, **params: Any) -> dict[str, Any]:
    _called(context)
    return {"log": [*state.log, f"undo:{context.step_name}"]}


async def undo_async(state: EngineState, context: StepContext, **params: Any) -> dict[str, Any]:
    _called(context)
    await asyncio.sleep(0)
    return {"log": [*state.log, f"undo:{context.step_name}"]}


def fail(state: EngineState, context: StepContext, **params: Any) -> None:
    _called(context)
    raise RuntimeError(f"{context.step_name} is broken")


def broken_undo(state: EngineState, context: StepContext, **params: Any) -> None:
    _called(context)
    raise RuntimeError(f"cannot undo {context.step_name}")


# -- the step contract -----------------------------------------------------------------------------


def wrong_field(state: EngineState, context: StepContext) -> dict[str, Any]:
    _called(context)
    return {"no_such_field": 1}


def wrong_type(state: EngineState, context: StepContext) -> dict[str, Any]:
    _called(context)
    return {"count": "many"}


def not_a_dict(state: EngineState, context: StepContext) -> list[int]:
    _called(context)
    return [1, 2]


def mutate_in_place(state: EngineState, context: StepContext) -> None:
    _called(context)
    state.log.append("mutated")
    state.count += 5


def mutate_then_fail(state: EngineState, context: StepContext) -> None:
    _called(context)
    state.log.append("junk")
    state.count = 99
    raise RuntimeError("failed after changing the state")


def key_probe(state: EngineState, context: StepContext) -> dict[str, Any]:
    _called(context)
    return {"keys": [*state.keys, context.idempotency_key]}


def flaky(state: EngineState, context: StepContext, *, succeed_on: int = 3) -> dict[str, Any]:
    """Raises until its ``succeed_on``-th attempt."""
    _called(context)
    if context.attempt < succeed_on:
        raise RuntimeError(f"flaky attempt {context.attempt}")
    return {"log": [*state.log, context.step_name], "count": context.attempt}


# -- timeouts and cancellation ----------------------------------------------------------------------


async def sleepy_async(
    state: EngineState, context: StepContext, *, seconds: float
) -> dict[str, Any]:
    _called(context)
    await asyncio.sleep(seconds)
    return {"note": "late"}


def sleepy_sync(state: EngineState, context: StepContext, *, seconds: float) -> dict[str, Any]:
    _called(context)
    time.sleep(seconds)
    state.note = "late in place"
    _called(context, f"late-done:{context.step_name}")
    return {"note": "late"}


async def wait_forever(state: EngineState, context: StepContext, **params: Any) -> None:
    """Waits on an event nobody sets, until it is cancelled."""
    _called(context)
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        _called(context, f"cancelled:{context.step_name}")
        raise


async def several_waits(state: EngineState, context: StepContext) -> dict[str, Any]:
    """Suspends several times (a bare yield, a timer, a future set later), then returns."""
    _called(context)
    await asyncio.sleep(0)
    await asyncio.sleep(0.01)
    fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_later(0.01, fut.set_result, "after three waits")
    return {"note": await fut}


async def cleans_up_when_cancelled(state: EngineState, context: StepContext) -> None:
    """Waits until cancelled, then still awaits its own clean-up before giving up."""
    _called(context)
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        await asyncio.sleep(0.01)
        _called(context, f"cleaned:{context.step_name}")
        raise


#: Called (with the workflow id) from the first, inline part of ``cancelled_before_it_waits``.
EARLY: dict[str, Any] = {}


async def cancelled_before_it_waits(state: EngineState, context: StepContext) -> None:
    """Has a cancel requested before it first waits (so before its task has run at all)."""
    _called(context)
    asyncio.get_running_loop().call_soon(EARLY[context.workflow_id])
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        _called(context, f"cancelled:{context.step_name}")
        raise


# -- retry after fixing the cause -----------------------------------------------------------------


def fail_if_flag(state: EngineState, context: StepContext) -> dict[str, Any]:
    """Fails while the file named by ``state.flag_file`` exists."""
    _called(context)
    if state.flag_file and Path(state.flag_file).exists():
        raise RuntimeError(f"{state.flag_file} is present")
    return {"log": [*state.log, context.step_name]}


def undo_fail_if_flag(state: EngineState, context: StepContext) -> dict[str, Any]:
    """A compensation that fails while the file named by ``state.flag_file`` exists."""
    _called(context)
    if state.flag_file and Path(state.flag_file).exists():
        raise RuntimeError(f"{state.flag_file} is present")
    return {"log": [*state.log, f"undo:{context.step_name}"]}


def flaky_undo(state: EngineState, context: StepContext) -> dict[str, Any]:
    """A compensation that fails on its first attempt only."""
    _called(context)
    if context.attempt == 1:
        raise RuntimeError(f"undo of {context.step_name} failed once")
    return {"log": [*state.log, f"undo:{context.step_name}"]}


# -- what is committed when a step starts -------------------------------------------------------


async def look_at_journal(state: EngineState, context: StepContext) -> dict[str, Any]:
    """Reads, through a read-only store of its own (another connection), what is committed when
    this step runs."""
    _called(context)
    assert state.db is not None
    async with SQLiteStore(state.db, readonly=True) as other:
        rows = await other.journal(context.workflow_id)
        record = await other.load_instance(context.workflow_id)
    assert record is not None
    seen = [f"{r.step}/{r.phase}/{r.attempt}/{r.outcome}" for r in rows]
    seen.append("log=" + ",".join(record.state["log"]))
    return {"log": [*state.log, context.step_name], "seen": [*state.seen, seen]}


# -- signatures for the definition tests ------------------------------------------------------------


def two_args_only(state: EngineState, context: StepContext) -> None:
    """Takes no params: incompatible with a step that has ``params``."""


def needs_level(state: EngineState, context: StepContext, *, level: int) -> None:
    """Needs a ``level`` param: incompatible with a step without one."""


NOT_CALLABLE = 42
