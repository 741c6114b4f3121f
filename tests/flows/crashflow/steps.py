"""Steps of the control-flow crash workflows.

Each step appends ``<Step>:start`` and ``<Step>:done`` (a compensation ``undo:<Step>:start`` /
``undo:<Step>:done``) to the ledger file, flushed and fsynced, so the ledger shows exactly what ran
even after a SIGKILL. Files beside the ledger steer a step, so a test can change them between
processes:

- ``hold-<Step>``: the step's first execution waits (awaiting, so it can be cancelled) while the
  file exists; the test kills the process meanwhile, or removes the file to let it go on;
- ``hold-undo-<Step>``: the same for the step's compensation;
- ``fail-<Step>``: the step raises while the file exists (removed before a ``retry``, say);
- ``fail-once-<Step>``: the step raises once, and removes the file;
- ``after-<Step>``: holds a line of the ledger the step waits for before it goes on (orders the
  branches of a PARALLEL step, so the order of completions is known).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent import StepContext
from tests.flows.crashflow.models import FlowState

POLL = 0.01  # seconds between looks at the steering files


def note(state: FlowState, line: str) -> None:
    with open(state.ledger, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _beside(state: FlowState, name: str) -> Path:
    return Path(state.ledger).with_name(name)


def ledger_lines(state: FlowState) -> list[str]:
    path = Path(state.ledger)
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


async def _until(done: Callable[[], bool]) -> None:
    """Poll ``done`` (it looks at files another process changes; no event can tell us)."""
    while not done():  # noqa: ASYNC110 - the condition is a file written by another process
        await asyncio.sleep(POLL)


async def _steer(state: FlowState, context: StepContext) -> None:
    """Wait and fail as the files beside the ledger say (see the module's docstring)."""
    name = context.step_name
    after = _beside(state, f"after-{name}")
    if after.exists():
        line = after.read_text(encoding="utf-8").strip()
        await _until(lambda: line in ledger_lines(state))
    hold = _beside(state, f"hold-{name}")
    if context.attempt == 1:
        await _until(lambda: not hold.exists())
    once = _beside(state, f"fail-once-{name}")
    if _beside(state, f"fail-{name}").exists() or once.exists():
        once.unlink(missing_ok=True)
        note(state, f"{name}:fail")
        raise RuntimeError(f"{name} fails on purpose")


async def step(state: FlowState, context: StepContext) -> None:
    """A forward step: note it, wait or fail as steered, note it done."""
    note(state, f"{context.step_name}:start")
    await _steer(state, context)
    note(state, f"{context.step_name}:done")


def step_sync(state: FlowState, context: StepContext) -> None:
    """:func:`step` as a plain function (it runs on a worker thread); it honours ``after-``,
    ``hold-`` and ``fail-`` files."""
    name = context.step_name
    note(state, f"{name}:start")
    after = _beside(state, f"after-{name}")
    line = after.read_text(encoding="utf-8").strip() if after.exists() else None
    while line is not None and line not in ledger_lines(state):
        time.sleep(POLL)
    hold = _beside(state, f"hold-{name}")
    while context.attempt == 1 and hold.exists():
        time.sleep(POLL)
    if _beside(state, f"fail-{name}").exists():
        note(state, f"{name}:fail")
        raise RuntimeError(f"{name} fails on purpose")
    note(state, f"{name}:done")


async def undo(state: FlowState, context: StepContext) -> None:
    """The compensation of :func:`step`."""
    note(state, f"undo:{context.step_name}:start")
    hold = _beside(state, f"hold-undo-{context.step_name}")
    if context.attempt == 1:
        await _until(lambda: not hold.exists())
    note(state, f"undo:{context.step_name}:done")


async def route(state: FlowState, context: StepContext) -> str:
    """The DECISION step: the route key the state carries."""
    note(state, f"{context.step_name}:start")
    await _steer(state, context)
    note(state, f"{context.step_name}:route={state.route}")
    return state.route


async def finish(state: FlowState, context: StepContext) -> dict[str, Any]:
    """The step after the HUMAN_INPUT step: notes what the person said."""
    note(state, f"{context.step_name}:start")
    await _steer(state, context)
    note(state, f"{context.step_name}:approved={state.approved}:note={state.note}")
    note(state, f"{context.step_name}:done")
    return {"note": f"{state.note} (seen)"}
