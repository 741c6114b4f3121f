"""State of the CrashTest workflow; the ``*_at`` fields choose where a run blocks, dies or fails."""

from __future__ import annotations

from pydantic import BaseModel


class CrashState(BaseModel):
    ledger: str  # file the steps append their progress to (fsynced, so it survives SIGKILL)
    block_at: str | None = None  # the step sleeps on its first execution; the test kills it
    kill_at: str | None = None  # the step SIGKILLs its own process on its first execution
    kill_always_at: str | None = None  # ... on every execution
    comp_kill_at: str | None = None  # the step's compensation SIGKILLs on its first execution
    fail_at: str | None = None  # the step raises
    kill_after_create: bool = False  # the runner SIGKILLs itself right after create_workflow
    done: list[str] = []
    undone: list[str] = []
