"""Runs workflows concurrently up to a limit; starts beyond it wait their turn.

The queue needs no table of its own: a started workflow is an ACTIVE row, so a restart finds every
queued workflow again through recovery.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from agent._engine import Workflow

log = logging.getLogger("edgesaga.runner")

_CANCEL_WAIT = 5.0  # seconds a cancelled workflow task gets to finish at shutdown


class Runner:
    """Drives submitted workflows with at most ``max_concurrent`` running at once.

    ``await runner.serve()`` owns one TaskGroup with a task per running workflow; ``stop(grace)``
    stops taking work, gives running steps ``grace`` seconds to reach a checkpoint and cancels the
    rest (their attempts are then interrupted, and recovery re-runs them).
    """

    def __init__(self, *, max_concurrent: int = 4) -> None:
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1.")
        self.max_concurrent = max_concurrent
        self._queue: deque[Workflow] = deque()
        self._queued_ids: set[str] = set()
        self._running: dict[str, asyncio.Task[None]] = {}
        self._workflows: dict[str, Workflow] = {}
        self._wake = asyncio.Event()
        self._accepting = True
        self._stopping = False
        self._tg: asyncio.TaskGroup | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._taken = asyncio.Event()  # set whenever workflows leave the queue (wait_for_room)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def accepting(self) -> bool:
        return self._accepting

    def is_scheduled(self, workflow_id: str) -> bool:
        return workflow_id in self._running or workflow_id in self._queued_ids

    def submit(self, workflow: Workflow) -> bool:
        """Queue ``workflow`` to be driven; False when it is already queued or running, or when
        the runner no longer accepts work (the workflow stays ACTIVE and recovery resumes it)."""
        if not self._accepting or self.is_scheduled(workflow.id):
            return False
        self._queue.append(workflow)
        self._queued_ids.add(workflow.id)
        self._idle.clear()
        self._wake.set()
        return True

    async def serve(self) -> None:
        """Run until :meth:`stop` is called; every workflow task belongs to this TaskGroup."""
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            while not self._stopping:
                while self._queue and len(self._running) < self.max_concurrent and self._accepting:
                    wf = self._queue.popleft()
                    self._queued_ids.discard(wf.id)
                    self._taken.set()
                    self._workflows[wf.id] = wf
                    self._running[wf.id] = tg.create_task(self._drive(wf), name=f"workflow:{wf.id}")
                if not self._queue and not self._running:
                    self._idle.set()
                self._wake.clear()
                await self._wake.wait()
        self._tg = None

    async def _drive(self, wf: Workflow) -> None:
        try:
            if not wf.is_running and not wf.status.is_terminal:
                await wf.run()
        except asyncio.CancelledError:
            log.warning("workflow %s stopped at shutdown; recovery resumes it", wf.id)
            raise
        except Exception:
            log.exception(
                "workflow %s: the runner failed; it stays in the database for recovery", wf.id
            )
        finally:
            self._running.pop(wf.id, None)
            self._workflows.pop(wf.id, None)
            self._wake.set()

    async def wait_for_room(self, limit: int) -> bool:
        """Wait until fewer than ``limit`` workflows are queued (recovery's backpressure: it reads
        its next page only then). False, at once, when the runner no longer accepts work."""
        while self._accepting and len(self._queue) >= limit:
            self._taken.clear()
            await self._taken.wait()
        return self._accepting

    async def wait_idle(self) -> None:
        """Wait until nothing is queued or running."""
        await self._idle.wait()

    async def stop(self, grace: float) -> int:
        """Stop taking work; wait up to ``grace`` seconds for running workflows, then cancel them.
        Returns how many were cut short."""
        self._accepting = False
        tasks = list(self._running.values())
        self._queue.clear()
        self._queued_ids.clear()
        self._taken.set()
        for wf_id in list(self._running):
            wf = self._workflows.get(wf_id)
            if wf is not None:
                wf.request_stop()
        cut = 0
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            cut = len(pending)
            # A cancelled driver lets go of its devices and returns at once; one that does not
            # (a step swallowing the cancel) is not waited for past this, so a stop never hangs.
            if pending:
                _, stuck = await asyncio.wait(pending, timeout=_CANCEL_WAIT)
                for task in stuck:
                    log.error(
                        "%s did not stop when cancelled; stopping without it", task.get_name()
                    )
        self._stopping = True
        self._wake.set()
        return cut
