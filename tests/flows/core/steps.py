"""Steps of the control-flow tests: each appends to the state's ledger and, when the test gives
one, to a ledger file (what ran, also in a process that is killed)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from agent import StepContext
from tests.flows.core.models import FlowState

#: Events a test and its steps share (one loop per test).
EVENTS: dict[str, asyncio.Event] = {}


def _write(name: str) -> None:
    path = os.environ.get("EDGESAGA_TEST_LEDGER")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(name + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def _done(state: FlowState, what: str) -> dict[str, Any]:
    _write(what)
    return {"ledger": [*state.ledger, what]}


def do(state: FlowState, context: StepContext, **params: Any) -> dict[str, Any]:
    return _done(state, context.step_name)


async def do_async(state: FlowState, context: StepContext, **params: Any) -> dict[str, Any]:
    await asyncio.sleep(0)
    return _done(state, context.step_name)


def undo(state: FlowState, context: StepContext, **params: Any) -> dict[str, Any]:
    return _done(state, f"undo:{context.step_name}")


def fail(state: FlowState, context: StepContext, **params: Any) -> None:
    _write(f"fail:{context.step_name}")
    raise RuntimeError(f"{context.step_name} failed")


def fail_once(state: FlowState, context: StepContext, **params: Any) -> dict[str, Any]:
    """Fails unless the state's note is "fixed" (a test sets it between retries)."""
    if state.note != "fixed":
        raise RuntimeError(f"{context.step_name} failed")
    return _done(state, context.step_name)


def choose(state: FlowState, context: StepContext, **params: Any) -> str | None:
    """The route the state names (None: the default)."""
    return state.route


async def choose_async(state: FlowState, context: StepContext, **params: Any) -> str | None:
    await asyncio.sleep(0)
    return state.route


async def set_event(state: FlowState, context: StepContext, *, name: str) -> dict[str, Any]:
    """Set a shared event after one wait: the other branch waits for it."""
    await asyncio.sleep(0)
    EVENTS.setdefault(name, asyncio.Event()).set()
    return {"a": 1, "ledger": [*state.ledger, context.step_name]}


async def await_event(state: FlowState, context: StepContext, *, name: str) -> dict[str, Any]:
    """Wait for the other branch's event: only concurrent branches can both finish."""
    await asyncio.wait_for(EVENTS.setdefault(name, asyncio.Event()).wait(), 10)
    return {"b": 2, "ledger": [*state.ledger, context.step_name]}


async def fail_after_event(state: FlowState, context: StepContext, *, name: str) -> None:
    await asyncio.wait_for(EVENTS.setdefault(name, asyncio.Event()).wait(), 10)
    _write(f"fail:{context.step_name}")
    raise RuntimeError(f"{context.step_name} failed")


async def wait_long(state: FlowState, context: StepContext, **params: Any) -> dict[str, Any]:
    """Waits until cancelled (a branch the failing one stops)."""
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        _write(f"cancelled:{context.step_name}")
        raise
    return _done(state, context.step_name)


def crash_once(state: FlowState, context: StepContext, **params: Any) -> dict[str, Any]:
    """Kills the process the first time (a flag file beside the ledger), then succeeds."""
    flag = os.environ.get("EDGESAGA_TEST_LEDGER", "") + f".{context.step_name}.crashed"
    if not os.path.exists(flag):
        with open(flag, "w", encoding="utf-8"):
            pass
        os.kill(os.getpid(), 9)
    return _done(state, context.step_name)
