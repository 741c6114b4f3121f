"""The agent's one timer service (DESIGN §11): every workflow waiting in a DELAY, woken when due.

A waiting workflow costs a heap entry ``(deadline, workflow_id)`` and a dict entry, not a Workflow
object, a task or a loop timer: one task sleeps until the earliest deadline (by ``loop.time()``,
which never jumps with the wall clock), loads the due workflows from the store, up to
``FIRE_PAGE`` with one query, and hands each to ``submit`` (the agent's runner). The workflow's drive decides again with the clock rules
(``_clock.decide``) and goes on, or comes back here with a new wait.

Timers that the clock's sync can change (an ``until:`` on an unsynchronized clock, a rebooted
timer whose wall deadline takes over at the sync) are also kept in a set; only while that set is
not empty does the task look at the sync file, every ``sync_poll`` seconds. An idle agent with
10,000 timers wakes no more often than one with none, except at its earliest deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agent._clock import Clock
from agent._status import WorkflowStatus

if TYPE_CHECKING:
    from agent._engine import Workflow, WorkflowBuilder
    from agent._store import SQLiteStore

log = logging.getLogger("edgesaga.timers")

#: Seconds between looks at the sync file while some timer waits on the clock's sync.
SYNC_POLL = 10.0
#: Due workflows loaded with one query when many timers fall due at once.
FIRE_PAGE = 256


class TimerService:
    """Wakes waiting workflows: ``watch(id, seconds)`` after ``seconds``, ``watch_sync(id)`` when the
    clock syncs; each due workflow is loaded and given to ``submit(workflow)``."""

    def __init__(
        self,
        builder: WorkflowBuilder,
        store: SQLiteStore,
        clock: Clock,
        submit: Callable[[Workflow], Any],
        *,
        sync_poll: float = SYNC_POLL,
    ) -> None:
        self.builder = builder
        self.store = store
        self.clock = clock
        self.submit = submit
        self.sync_poll = sync_poll
        self._heap: list[tuple[float, str]] = []
        self._deadline: dict[str, float] = {}  # workflow id -> its current loop-time deadline
        self._on_sync: set[str] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._running = False
        #: How many times the task has woken (for the idle-cost check: it grows with the
        #: deadlines reached and the registrations that move the earliest one, never per timer).
        self.wakeups = 0
        self._firing: set[asyncio.Task[None]] = set()

    # -- what the status shows -----------------------------------------------------------------
    def count(self) -> int:
        """How many workflows wait on a timer."""
        return len(self._deadline.keys() | self._on_sync)

    def count_waiting_on_sync(self) -> int:
        """How many of them wait (also) for the clock to be synchronized."""
        return len(self._on_sync)

    def next_wait(self) -> float | None:
        """Seconds until the earliest deadline (None: no deadline), by the loop's clock."""
        self._drop_stale()
        if not self._heap:
            return None
        return max(0.0, self._heap[0][0] - asyncio.get_running_loop().time())

    def waits(self, workflow_id: str) -> float | None:
        """Seconds until ``workflow_id``'s deadline, or None when it has none here."""
        at = self._deadline.get(workflow_id)
        return None if at is None else max(0.0, at - asyncio.get_running_loop().time())

    # -- registering ----------------------------------------------------------------------------
    def watch(self, workflow_id: str, seconds: float, *, on_sync: bool = False) -> None:
        """Wake ``workflow_id`` in ``seconds`` (and, ``on_sync``, also when the clock syncs)."""
        at = asyncio.get_running_loop().time() + max(0.0, seconds)
        self._deadline[workflow_id] = at
        heapq.heappush(self._heap, (at, workflow_id))
        if on_sync:
            self._on_sync.add(workflow_id)
        else:
            self._on_sync.discard(workflow_id)
        if self._heap[0][1] == workflow_id or on_sync:
            self._wake.set()

    def watch_sync(self, workflow_id: str) -> None:
        """Wake ``workflow_id`` when the clock syncs (an ``until:`` before the sync)."""
        self._deadline.pop(workflow_id, None)
        self._on_sync.add(workflow_id)
        self._wake.set()

    def forget(self, workflow_id: str) -> None:
        """``workflow_id`` no longer waits (its heap entry is dropped when it comes up)."""
        self._deadline.pop(workflow_id, None)
        self._on_sync.discard(workflow_id)

    # -- running --------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the one task (on the running loop)."""
        if self._task is None:
            self._running = True
            self._task = asyncio.ensure_future(self._serve())

    async def stop(self) -> None:
        """Stop the task and wait for the hand-overs under way."""
        task, self._task = self._task, None
        if task is not None:
            # A flag, not only task.cancel(): wait_for swallows a cancel that meets its wake-up.
            self._running = False
            self._wake.set()
            await asyncio.gather(task, return_exceptions=True)
        if self._firing:
            await asyncio.gather(*self._firing, return_exceptions=True)

    def _drop_stale(self) -> None:
        heap = self._heap
        while heap and self._deadline.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)

    def _timeout(self) -> float | None:
        self._drop_stale()
        timeout = None
        if self._heap:
            timeout = max(0.0, self._heap[0][0] - asyncio.get_running_loop().time())
        if self._on_sync:
            timeout = self.sync_poll if timeout is None else min(timeout, self.sync_poll)
        return timeout

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._running:  # stopped before this task first ran: its wake-up is spent
                return
            self._wake.clear()
            timeout = self._timeout()
            if timeout is None or timeout > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
            if not self._running:
                return
            self.wakeups += 1
            now = loop.time()
            due: list[str] = []
            heap = self._heap
            while heap and heap[0][0] <= now:
                at, wid = heapq.heappop(heap)
                if self._deadline.get(wid) == at:
                    del self._deadline[wid]
                    self._on_sync.discard(wid)
                    due.append(wid)
            if self._on_sync and self.clock.synchronized():
                synced = sorted(self._on_sync)
                self._on_sync.clear()
                for wid in synced:
                    self._deadline.pop(wid, None)
                due.extend(synced)
            if due:
                task = asyncio.ensure_future(self._fire(due))
                self._firing.add(task)
                task.add_done_callback(self._firing.discard)

    async def _fire(self, due: list[str]) -> None:
        """Load the due workflows, a page at a time with one query each, and hand each to the
        runner; its drive decides with the clock."""
        builder, store = self.builder, self.store
        for start in range(0, len(due), FIRE_PAGE):
            ids = due[start : start + FIRE_PAGE]
            try:
                records = await store.load_instances(ids)
            except Exception:
                log.exception("%d due timer(s): their workflows cannot be loaded", len(ids))
                continue
            for wid in ids:
                wf = builder.live(wid)
                if wf is None or wf.store is not store:
                    rec = records.get(wid)
                    if rec is None:
                        continue  # gone (pruned) meanwhile
                    try:
                        wf = builder.rebuild(rec, store)
                    except Exception:
                        log.exception("workflow %s: its timer is due but it cannot be loaded", wid)
                        continue
                self._hand_over(wf)

    def _hand_over(self, wf: Workflow) -> None:
        if wf.is_running:
            return  # whoever drives it decides its timer
        if wf.status is WorkflowStatus.PAUSED:
            self.builder.pause_timer_fired(wf)  # a HUMAN_INPUT's timeout
            return
        if not wf.in_delay:
            return  # it went on without the timer (cancelled meanwhile, say)
        self.submit(wf)
