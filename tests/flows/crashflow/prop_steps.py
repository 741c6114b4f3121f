"""Steps of the generated workflows of tests/test_flow_properties.py.

They keep their record in memory, in :data:`LEDGER` (reset per example): ``("run", step)`` when a
forward step starts, ``("done", step)`` when it completes, ``("fail", step)`` when it raises,
``("undo", step)`` when a compensation completes, ``("decide", step)`` for a DECISION. A step
raises while :data:`FAILS` still counts failures for it, after :data:`YIELDS` awaits (or a
sleep); a DECISION returns :data:`ROUTES`' key. :func:`step` is async, :func:`step_sync` runs on
a worker thread. After a simulated crash (:func:`crashed`) nothing of that life is recorded any
more, not even by a thread that goes on: that process is gone.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from agent import StepContext

LEDGER: list[tuple[str, str]] = []
FAILS: dict[str, int] = {}  # step -> failures still to raise
#: FAILS as of the last commit: a failure the dead process did not commit is raised again
#: (the run that raised it never happened, as far as the workflow can know).
FAILS_COMMITTED: dict[str, int] = {}
ROUTES: dict[str, str | None] = {}  # DECISION step -> the key it returns
YIELDS: dict[str, int] = {}  # step -> awaits it makes before it ends (default 1; SLOW: a sleep)
SLOW = -1  # the step sleeps SLOW_SECONDS: a sibling branch's failure stops it before it ends
SLOW_SECONDS = 0.05


class World:
    """Which life (process) is running, and whether it has died."""

    life = 0
    dead = False
    sync_running = 0  # executions of step_sync not yet returned
    lock = threading.Lock()  # worker threads record too


def reset(fails: dict[str, int], routes: dict[str, str | None], yields: dict[str, int]) -> None:
    with World.lock:
        LEDGER.clear()
        YIELDS.clear()
        YIELDS.update(yields)
        FAILS.clear()
        FAILS.update(fails)
        FAILS_COMMITTED.clear()
        FAILS_COMMITTED.update(fails)
        ROUTES.clear()
        ROUTES.update(routes)
        World.dead = False


def crashed() -> None:
    """The process died: nothing more is recorded, and uncommitted failures are undone."""
    with World.lock:
        World.dead = True
        FAILS.clear()
        FAILS.update(FAILS_COMMITTED)


def reborn() -> None:
    """A new process starts (after :func:`crashed`)."""
    with World.lock:
        World.life += 1
        World.dead = False


def fixed(steps: list[str]) -> None:
    """An operator fixed what made ``steps`` fail: they fail no more."""
    with World.lock:
        for name in steps:
            FAILS.pop(name, None)
            FAILS_COMMITTED.pop(name, None)


def _record(life: int, what: str, step: str) -> bool:
    with World.lock:
        if World.dead or World.life != life:
            return False
        LEDGER.append((what, step))
        return True


def _spend_failure(life: int, name: str) -> bool:
    """Does this execution fail? (It spends one of the step's failures.)"""
    with World.lock:
        if World.dead or World.life != life or FAILS.get(name, 0) <= 0:
            return False
        FAILS[name] -= 1
        LEDGER.append(("fail", name))
        return True


async def step(state: Any, context: StepContext) -> None:
    name, life = context.step_name, World.life
    if not _record(life, "run", name):
        return
    yields = YIELDS.get(name, 1)
    if yields == SLOW:
        await asyncio.sleep(SLOW_SECONDS)
    for _ in range(yields):
        await asyncio.sleep(0)  # where the other branches run, and a cancel lands
    if _spend_failure(life, name):
        raise RuntimeError(f"{name} fails on purpose")
    _record(life, "done", name)


def step_sync(state: Any, context: StepContext) -> None:
    """:func:`step` on a worker thread: a failing sibling branch cannot stop it."""
    name, life = context.step_name, World.life
    with World.lock:
        World.sync_running += 1
    try:
        if not _record(life, "run", name):
            return
        if YIELDS.get(name, 1) == SLOW:
            time.sleep(SLOW_SECONDS)
        if _spend_failure(life, name):
            raise RuntimeError(f"{name} fails on purpose")
        _record(life, "done", name)
    finally:
        with World.lock:
            World.sync_running -= 1


async def sync_steps_returned() -> None:
    """Until every execution of :func:`step_sync` has returned (a dead life's loop waits for its
    threads before it closes, so none of them hands a result to a closed loop)."""
    for _ in range(5000):
        if not World.sync_running:
            return
        await asyncio.sleep(0.001)


async def undo(state: Any, context: StepContext) -> None:
    life = World.life
    await asyncio.sleep(0)
    _record(life, "undo", context.step_name)


async def decide(state: Any, context: StepContext) -> str | None:
    _record(World.life, "decide", context.step_name)
    return ROUTES.get(context.step_name)
