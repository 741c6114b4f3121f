"""Recovery after a restart, in two parts so that its cost before READY does not grow with the
number of workflows left running.

1. Before READY, :func:`mark_interrupted_attempts`: one pass over the store records every attempt
   the agent died in as interrupted (one or a few commits, whatever their number).
2. After READY, :class:`Feeder`: the unfinished workflows are read a page at a time in the order
   they were created, each rebuilt from its record (read once), the interrupted rule applied, and
   handed to the runner; the next page is read only once the runner's queue has room, so memory
   stays flat however many there are. There is no limit: every one is resumed.

:func:`recover` does both and drives every workflow to its end (``edgesaga recover``).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, NamedTuple

from agent import _clock
from agent import _saga as saga
from agent._messages import alert
from agent._records import InstanceRecord
from agent._status import RESUMABLE, WorkflowStatus
from agent._store import SQLiteStore, dumps, iso

if TYPE_CHECKING:  # the engine imports this module; it needs the engine's types only
    from agent._engine import Workflow, WorkflowBuilder
    from agent._runner import Runner

log = logging.getLogger("edgesaga.workflow")

#: Unfinished workflows read, rebuilt and handed over at a time; the runner's queue is kept below
#: it before the next page is read.
PAGE_SIZE = 256


async def mark_interrupted_attempts(store: SQLiteStore) -> int:
    """Record every attempt still 'started' of an unfinished workflow as interrupted: the agent
    died while it ran. One pass over the store, before anything runs. Returns how many."""
    return await store.mark_interrupted_attempts(at=time.time(), error=saga.INTERRUPTED)


async def _alert_unbuildable(store: SQLiteStore, rec: InstanceRecord, exc: Exception) -> None:
    # One instance that cannot be rebuilt (its step module was removed, say) must not keep the
    # others from resuming: it stays as it is, and a person is told.
    message = (
        f"Workflow {rec.id} ({rec.workflow_type}) cannot be resumed: {exc} It stays "
        f"{rec.status.value}; restore the code it was started with and restart the agent."
    )
    log.error(message)
    payload = alert(
        "recovery_failed",
        message,
        at=iso(time.time()),
        workflow_id=rec.id,
        workflow_type=rec.workflow_type,
    )
    await store.add_alert(dict(payload), workflow_id=rec.id)


async def _changed(store: SQLiteStore, page: list[tuple[int, InstanceRecord]]) -> set[str]:
    """The ids of the page's instances written since the page was read (a command finished
    with one in between), or gone: their records are stale."""
    read = {n: rec.updated_at for n, rec in page}
    marks = ",".join("?" * len(read))
    now = await store.query(
        lambda conn: dict(
            conn.execute(f"SELECT n, updated_at FROM instances WHERE n IN ({marks})", list(read))
        )
    )
    return {rec.id for n, rec in page if now.get(n) != rec.updated_at}


async def _reload(
    builder: WorkflowBuilder, store: SQLiteStore, workflow_id: str
) -> Workflow | None:
    """A workflow whose page record went stale, read again: the live object if a command holds
    it and leaves it idle, else rebuilt if it is still unfinished (a rare second read)."""
    live = builder.live(workflow_id)
    if live is None:
        rec = await store.load_instance(workflow_id)
        if rec is None or rec.status not in RESUMABLE:
            return None
        live = builder.live(workflow_id)  # a command may have loaded it meanwhile
        if live is None:
            try:
                live = builder.rebuild(rec, store)
            except Exception as exc:
                await _alert_unbuildable(store, rec, exc)
                return None
            return live  # its cut attempt, if any, the engine marks when it first drives it
    if live.is_running or live.status.is_terminal:
        return None
    return live


class _Parked(NamedTuple):
    n: int
    updated_at: float
    workflow_id: str
    progress_json: str
    wait: float
    on_sync: bool


def _parkable(
    builder: WorkflowBuilder, rec: InstanceRecord, reading: _clock.ClockReading
) -> _Parked | None:
    """The record's rebased timer, when the record only waits in its DELAY: ACTIVE, nothing in
    flight, a timer armed in an earlier run that still waits after the rebase, and an
    ``on_restart`` that changes nothing (resume, or a rollback with nothing run). None: it takes
    the Workflow path (rebuilt, its on_restart applied, ``settle_timer``)."""
    if rec.status is not WorkflowStatus.ACTIVE or builder.live(rec.id) is not None:
        return None
    known = builder.known_plan(rec.definition_hash)
    if known is None:
        return None
    definition, plan = known
    try:
        progress = saga.Progress.from_json(rec.progress)
    except Exception:
        return None  # the Workflow path reports it
    if (
        progress.status is not WorkflowStatus.ACTIVE
        or progress.inflight is not None
        or progress.running
        or progress.next_step is None
        or plan.special.get(progress.next_step) != "DELAY"
        or progress.timer is None
        or not builder.needs_rebase(progress.timer, reading)
    ):
        return None
    rule = definition.spec.restart_rule
    if rule == "restore" or saga.restarted(plan, progress, rule) is not None:
        return None
    mark = _clock.rebase(progress.timer, reading)
    decision = _clock.decide(mark, reading)
    if not isinstance(decision, _clock.Wait):
        return None  # due, late or waiting on the sync: the Workflow path decides it
    change = saga.delay_rebased(plan, progress, mark)
    return _Parked(
        0,
        rec.updated_at,
        rec.id,
        dumps(change.progress.to_json()),
        decision.seconds,
        _clock.waits_on_sync(mark, reading),
    )


async def _park_in_bulk(
    builder: WorkflowBuilder, store: SQLiteStore, page: list[tuple[int, InstanceRecord]]
) -> list[tuple[int, InstanceRecord]]:
    """Rebase and park the page's records that only wait in a DELAY without building a Workflow
    for each: their rebased marks are committed in one write (a row written since the page was
    read is left alone) and each (deadline, id) is handed to the timer service. Returns the rest
    of the page, for the Workflow path."""
    timers = builder.timers
    if timers is None:
        return page
    reading = _clock.read_clock(builder.clock)
    parked: list[_Parked] = []
    rest: list[tuple[int, InstanceRecord]] = []
    for n, rec in page:
        found = _parkable(builder, rec, reading)
        if found is None:
            rest.append((n, rec))
        else:
            parked.append(found._replace(n=n))
    if not parked:
        return page
    at = time.time()

    def write(conn: sqlite3.Connection) -> list[bool]:
        return [
            conn.execute(
                "UPDATE instances SET progress = ?, updated_at = ? WHERE n = ? AND updated_at = ?",
                (p.progress_json, at, p.n, p.updated_at),
            ).rowcount
            == 1
            for p in parked
        ]

    try:
        written = await store.write(write)
    except Exception as exc:
        log.error("recovery: %d DELAY timer(s) could not be rebased: %s", len(parked), exc)
        return rest  # they stay as they are in the store: the next start tries them again
    left = {n for n, _ in rest}
    for p, ok in zip(parked, written, strict=True):
        if ok:
            timers.watch(p.workflow_id, p.wait, on_sync=p.on_sync)
        else:
            left.add(p.n)  # a command wrote its row in between: the Workflow path reads it again
    return [(n, rec) for n, rec in page if n in left]


async def _rebuild_page(
    builder: WorkflowBuilder, store: SQLiteStore, page: list[tuple[int, InstanceRecord]]
) -> list[Workflow]:
    """The page's workflows, rebuilt from their records with the interrupted rule applied.

    A workflow this builder already has in memory is not rebuilt: the one in memory is
    authoritative (a command that arrived during the feed made or loaded it), and one that is
    running or finished is left to whoever holds it. The rebuilt ones are registered before the
    first await, so a command arriving from here on gets these objects; one whose row was written
    between the page's read and then (a command finished with it) is dropped, not run from its
    stale record."""
    workflows: list[Workflow] = []
    rebuilt: list[Workflow] = []
    failed: list[tuple[InstanceRecord, Exception]] = []
    for _, rec in page:
        live = builder.live(rec.id)
        if live is not None and live.store is store:
            if not live.is_running and not live.status.is_terminal:
                workflows.append(live)
            continue
        try:
            wf = builder.rebuild(rec, store)
        except Exception as exc:
            failed.append((rec, exc))
            continue
        workflows.append(wf)
        rebuilt.append(wf)
    stale = await _changed(store, page) if rebuilt else set()
    for wf in [w for w in rebuilt if w.id in stale]:
        rebuilt.remove(wf)
        workflows.remove(wf)
        if wf.is_running or wf.status.is_terminal:
            continue  # a command took this object during the check: it drives it, or it is done
        builder.release(wf)
        again = await _reload(builder, store, wf.id)
        if again is not None:
            workflows.append(again)
    for rec, error in failed:
        if rec.id not in stale:
            await _alert_unbuildable(store, rec, error)
    # The journal rows were ended by mark_interrupted_attempts; what the state machine makes of
    # each cut attempt (run it again, or give up and roll back) commits here, the page's commits
    # grouped by the writer.
    cut = {wf.id: _cut_forward_step(wf) for wf in rebuilt}
    marked = await asyncio.gather(
        *(wf.mark_interrupted(journal_ended=True) for wf in rebuilt), return_exceptions=True
    )
    for wf, outcome in zip(rebuilt, marked, strict=True):
        if isinstance(outcome, Exception):
            # It stays as it is in the store: the next start tries it again.
            log.error(
                "workflow %s: its interrupted attempt could not be recorded: %s", wf.id, outcome
            )
            workflows.remove(wf)
    await _on_restart(rebuilt, workflows, cut)
    return await _park_waiting(builder, workflows)


def _cut_forward_step(wf: Workflow) -> str | None:
    fl = wf.progress.inflight
    return fl.step if fl is not None and fl.phase == "forward" else None


async def _on_restart(
    rebuilt: list[Workflow], workflows: list[Workflow], cut: dict[str, str | None]
) -> None:
    """Each rebuilt workflow's ``on_restart`` (its outputs were set safe at start): a rollback
    committed, or its outputs restored; the page's commits grouped."""
    todo = [wf for wf in rebuilt if wf in workflows]
    outcomes = await asyncio.gather(
        *(wf.apply_on_restart(cut.get(wf.id)) for wf in todo), return_exceptions=True
    )
    for wf, outcome in zip(todo, outcomes, strict=True):
        if isinstance(outcome, Exception):
            log.error("workflow %s: its on_restart could not be applied: %s", wf.id, outcome)
            workflows.remove(wf)  # it stays as it is in the store: the next start tries again


async def _park_waiting(builder: WorkflowBuilder, workflows: list[Workflow]) -> list[Workflow]:
    """The page's workflows less those waiting in a DELAY: each of those has its timer rebased
    onto this run (committed, the page's commits grouped) and is handed to the timer service,
    which holds its id and deadline only; the Workflow object is dropped."""
    if builder.timers is None:
        return workflows
    waiting = [wf for wf in workflows if wf.in_delay]
    if not waiting:
        return workflows
    settled = await asyncio.gather(*(wf.settle_timer() for wf in waiting), return_exceptions=True)
    parked = set()
    for wf, outcome in zip(waiting, settled, strict=True):
        if isinstance(outcome, Exception):
            log.error("workflow %s: its DELAY timer could not be rebased: %s", wf.id, outcome)
            parked.add(wf.id)  # it stays as it is in the store: the next start tries it again
        elif outcome is False:
            parked.add(wf.id)
    return [wf for wf in workflows if wf.id not in parked]


async def pages(
    builder: WorkflowBuilder,
    store: SQLiteStore,
    *,
    page_size: int = PAGE_SIZE,
    room: Callable[[int], Awaitable[bool]] | None = None,
) -> AsyncIterator[list[Workflow]]:
    """Every unfinished workflow, rebuilt, a page at a time in creation order.

    ``room(page_size)``, when given, is awaited before each page is read; False ends the feed (the
    runner stopped taking work; what is left stays in the store for the next start)."""
    after = 0
    while True:
        if room is not None and not await room(page_size):
            return
        page = await store.resumable_page(after_n=after, limit=page_size)
        if not page:
            return
        after = page[-1][0]
        rest = await _park_in_bulk(builder, store, page)
        yield await _rebuild_page(builder, store, rest) if rest else []


class Feeder:
    """After READY: hands every unfinished workflow to ``runner`` in creation order, a page at a
    time, reading the next page only when the runner's queue has room for it.

    ``backlog`` (the number of unfinished workflows counted at start-up) goes down as pages are
    handed over, for the status text; ``first_page`` is set once the first page is handed over
    (or there was none), so maintenance starts after recovery is under way.
    """

    def __init__(
        self,
        builder: WorkflowBuilder,
        store: SQLiteStore,
        runner: Runner,
        *,
        backlog: int = 0,
        page_size: int = PAGE_SIZE,
    ) -> None:
        self.builder = builder
        self.store = store
        self.runner = runner
        self.backlog = backlog
        self.page_size = page_size
        self.resumed = 0
        self.first_page = asyncio.Event()

    async def run(self) -> int:
        """Feed until every unfinished workflow is handed over; returns how many were."""
        try:
            async for workflows in pages(
                self.builder, self.store, page_size=self.page_size, room=self.runner.wait_for_room
            ):
                for wf in workflows:
                    if self.runner.submit(wf):
                        self.resumed += 1
                self.backlog = max(0, self.backlog - self.page_size)
                self.first_page.set()
        finally:
            self.backlog = 0
            self.first_page.set()
        log.info("recovery: %d workflow(s) resumed", self.resumed)
        return self.resumed


async def recover(
    builder: WorkflowBuilder, store: SQLiteStore, *, run: bool = True
) -> list[Workflow]:
    """Resume every ``ACTIVE`` and ``COMPENSATING`` instance, oldest first.

    Attempts cut short by the agent dying are recorded as interrupted first. With ``run=True``
    (the default) each page of workflows is driven to a terminal status concurrently before the
    next is read, and all are returned once done; with ``run=False`` they are returned for the
    caller to drive (every one in memory at once: the agent uses :class:`Feeder` instead).
    """
    await mark_interrupted_attempts(store)
    workflows: list[Workflow] = []
    async for page in pages(builder, store):
        if run:
            await asyncio.gather(*(wf.run() for wf in page))
        workflows.extend(page)
    return workflows
