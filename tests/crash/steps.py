"""Steps of the CrashTest workflow. Each appends ``step<n>:start`` / ``step<n>:done`` (or
``comp<n>:...``) lines to the ledger file, flushed and fsynced, and may block, die or fail where the
workflow's data says."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from agent import StepContext
from tests.crash.models import CrashState


def note(state: CrashState, line: str) -> None:
    with open(state.ledger, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # not reached: SIGKILL cannot be caught


def step(state: CrashState, context: StepContext, *, n: int) -> dict[str, Any]:
    name = context.step_name
    note(state, f"step{n}:start")
    if state.kill_always_at == name:
        die()
    if state.kill_at == name and context.attempt == 1:
        die()
    if state.block_at == name and context.attempt == 1:
        time.sleep(60)  # the test kills the process while it sleeps here
    if state.fail_at == name:
        raise RuntimeError(f"{name} fails on purpose")
    note(state, f"step{n}:done")
    return {"done": [*state.done, name]}


def compensate(state: CrashState, context: StepContext, *, n: int) -> dict[str, Any]:
    name = context.step_name
    note(state, f"comp{n}:start")
    if state.comp_kill_at == name and context.attempt == 1:
        die()
    note(state, f"comp{n}:done")
    return {"undone": [*state.undone, name]}
