"""Steps of the fail-safe workflows, a pin recorder and one injected fault; imported by the agent.

* ``hold`` writes ``state.mark`` when it starts and returns once ``state.release`` exists.
* ``break_next_commit`` makes the store's next commit of its workflow raise
  ``sqlite3.IntegrityError`` (the error issue 10 saw escape the runner), once per agent process, so
  the exception escapes the workflow's driver while the workflow holds its outputs.
* With ``EDGESAGA_FAILSAFE_PIN_LOG=PATH`` in its environment, the agent process writes every mock
  pin's history (the list ``pins`` with ``history`` returns) to PATH as JSON when it exits, after
  its last safe-state: the history of an agent that has stopped, which no command can ask for.
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import json
import os
import sqlite3
from pathlib import Path
from typing import Any

from agent._store import SQLiteStore, Transition
from hardware import Board

PIN_LOG_ENV = "EDGESAGA_FAILSAFE_PIN_LOG"

_pins: dict[str, Any] = {}  # device name -> its gpiozero mock pin (kept after the board closes)


def _remember(board: Any) -> None:
    if _pins or not isinstance(board, Board) or board.closed or not board.is_mock:
        return
    for name in board:
        _pins[name] = board[name].gpio.pin


def _write_pin_log() -> None:
    path = os.environ.get(PIN_LOG_ENV)
    if path:
        history = {name: [s.state for s in pin.states] for name, pin in _pins.items()}
        Path(path).write_text(json.dumps(history))


if os.environ.get(PIN_LOG_ENV):
    # The agent opens its board before it loads the definitions that import this module.
    for _obj in gc.get_objects():
        if isinstance(_obj, Board):
            _remember(_obj)
    atexit.register(_write_pin_log)


async def note(state: Any, context: Any) -> None:
    """A step with no side effect."""
    _remember(context.hardware)


async def fail(state: Any, context: Any) -> None:
    """A step that always fails (the saga then compensates)."""
    raise RuntimeError("the flow sensor reports no flow")


async def hold(state: Any, context: Any, pad: int = 0) -> dict[str, Any] | None:
    """Write ``state.mark`` ("<pid> attempt <n>"), then wait until ``state.release`` exists.
    Returns ``pad`` bytes in ``state.note``: a result whose commit needs that much new space."""
    _remember(context.hardware)
    if state.mark:
        Path(state.mark).write_text(f"{os.getpid()} attempt {context.attempt}\n")  # noqa: ASYNC240 - a tiny marker file for the test
    while state.release and not os.path.exists(state.release):  # noqa: ASYNC110, ASYNC240 - a test's file: nothing to await
        await asyncio.sleep(0.02)
    return {"note": "." * pad} if pad else None


_broken = False


async def break_next_commit(state: Any, context: Any) -> None:
    """Arm the fault: the next commit of this workflow (this step's result) raises. Used as a
    compensation too, to make the fault strike during a rollback."""
    global _broken
    _remember(context.hardware)
    if _broken:
        return
    _broken = True
    original = SQLiteStore.commit
    workflow_id = context.workflow_id

    async def commit(self: SQLiteStore, transition: Transition) -> None:
        if transition.workflow_id != workflow_id:
            await original(self, transition)
            return
        SQLiteStore.commit = original  # type: ignore[method-assign]
        raise sqlite3.IntegrityError(
            "UNIQUE constraint failed: journal.k (injected by tests/failsafe/steps.py)"
        )

    SQLiteStore.commit = commit  # type: ignore[method-assign]
