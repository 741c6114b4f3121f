"""Step functions for the service tests (dotted paths ``tests.flows.service.steps``).

They run inside a real ``edgesaga run`` subprocess, so everything a test needs to observe goes to
files named in the workflow's state (``marker``, ``flag``, ``record``), never to module globals.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from agent import StepContext


class ServiceState(BaseModel):
    """State shared by every service test workflow."""

    seconds: float = 10.0  # how long the long steps sleep
    marker: str | None = None  # Long_Sleep sleeps only while this file does not exist yet
    flag: str | None = None  # Needs_Flag fails until this file exists
    record: str | None = None  # Lamp_On writes the lamp's pin history here when the agent exits
    done: list[str] = []
    compensations: list[str] = []


async def quick(state: ServiceState, context: StepContext, **params: Any) -> dict[str, Any]:
    """Returns at once."""
    return {"done": [*state.done, context.step_name]}


async def undo(state: ServiceState, context: StepContext, **params: Any) -> dict[str, Any]:
    """Compensation: records its own run in ``compensations``."""
    return {"compensations": [*state.compensations, context.step_name]}


def _claim_first_run(marker: str | None, attempt: int) -> bool:
    """True (and the marker file created) when ``marker`` does not exist yet."""
    if marker is None:
        return True
    try:
        with open(marker, "x") as fh:
            fh.write(f"{attempt}\n")
    except FileExistsError:
        return False
    return True


async def sleep_first_time(
    state: ServiceState, context: StepContext, **params: Any
) -> dict[str, Any]:
    """Sleeps ``seconds`` on its first execution only: the first run creates ``marker``; a run
    that finds the marker (the re-run after an interrupted attempt) returns at once."""
    if await asyncio.to_thread(_claim_first_run, state.marker, context.attempt):
        await asyncio.sleep(state.seconds)
    return {"done": [*state.done, f"{context.step_name}#{context.attempt}"]}


async def sleep_long(state: ServiceState, context: StepContext, **params: Any) -> dict[str, Any]:
    """Sleeps ``seconds`` every time (a step that is still running when the test acts)."""
    await asyncio.sleep(state.seconds)
    return {"done": [*state.done, context.step_name]}


def needs_flag(state: ServiceState, context: StepContext, **params: Any) -> dict[str, Any]:
    """A sync step that fails until the ``flag`` file exists."""
    if state.flag is None or not os.path.exists(state.flag):
        raise RuntimeError(f"flag file {state.flag} does not exist yet")
    return {"done": [*state.done, context.step_name]}


def _dump_pin_history(path: str, pin: Any) -> None:
    Path(path).write_text(json.dumps([bool(s.state) for s in pin.states]))


async def lamp_on(
    state: ServiceState, context: StepContext, device: str = "lamp", **params: Any
) -> dict[str, Any]:
    """Turn a mock output on. When ``record`` is set, register an exit hook that writes the pin's
    whole recorded history (gpiozero ``MockPin.states``) to that file: the last entry is the level
    the pin was left at when the agent process ended."""
    board = context.hardware
    if board is None:
        raise RuntimeError("Lamp_On needs the agent's hardware board")
    board[device].on()
    if state.record is not None:
        atexit.register(_dump_pin_history, state.record, board[device].gpio.pin)
    return {"done": [*state.done, context.step_name]}
