"""A fake-clock agent for the timer tests: a builder and its timer service over a real store,
whose due workflows are collected for the test to drive instead of run, and recovery's feed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent import SQLiteStore, WorkflowBuilder, _recovery
from agent._clock import FakeClock
from agent._engine import Workflow


class Agent:
    """One agent run over the store: a builder with the fake clock and its timer service, whose
    due workflows are collected (a test drives them) instead of run."""

    def __init__(self, definition: Path, clock: FakeClock) -> None:
        self.builder = WorkflowBuilder([definition], clock=clock)
        self.submitted: list[Workflow] = []

    async def start(self, store: SQLiteStore) -> Agent:
        await self.builder.start_timers(store, self.submitted.append)
        return self

    @property
    def timers(self) -> Any:
        assert self.builder.timers is not None
        return self.builder.timers

    async def stop(self) -> None:
        await self.builder.stop_timers()


async def recover(agent: Agent, store: SQLiteStore) -> list[Workflow]:
    """Recovery's feed: what it would hand to the runner (the parked ones it keeps back)."""
    await _recovery.mark_interrupted_attempts(store)
    out: list[Workflow] = []
    async for page in _recovery.pages(agent.builder, store):
        out.extend(page)
    return out
