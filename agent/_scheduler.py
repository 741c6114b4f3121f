"""The agent's scheduler (DESIGN §11): one task that starts each schedule's workflow at its slots.

It sleeps on the event loop's clock until the next due slot of any schedule (:func:`next_due`),
for at most :data:`MAX_SLEEP` seconds at a time, and decides again by the wall clock when it
wakes, so a wall clock that jumps (NTP stepping a board without a real-time clock) is noticed
within that time. What fires is :func:`due_slots`' decision over the schedule's latest fire in
the store: nothing before the clock is synchronized, ``missed`` and ``overlap`` applied, and
never a slot at or before one that fired (the store refuses it too, in the transaction that
would create the workflow).

A fire goes through the same path as a start command (``fire`` is
:meth:`agent._control.Control.fire_schedule` in the agent): its request id names the schedule
and the slot, the workflow is journaled like any other and runs in the runner.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

from agent._clock import Clock
from agent._schedules import (
    ScheduleConfig,
    due_slots,
    next_due,
    slot_from_key,
    slot_key,
)
from agent._store import LastFire, SQLiteStore

log = logging.getLogger("edgesaga.schedules")

#: The longest the scheduler sleeps before it reads the wall clock again (a jump is seen by then).
MAX_SLEEP = 5.0
#: How often it looks at the clock's sync while the clock is not synchronized.
SYNC_POLL = 2.0

#: Refusals that are not the schedule's fault: its slot is tried again at the next wake.
_TRY_AGAIN = frozenset({"disk_full", "internal_error"})

#: ``fire(schedule, slot_key) -> reply``: start the schedule's workflow for that slot.
Fire = Callable[[ScheduleConfig, str], Awaitable[dict[str, Any]]]


class Fired(NamedTuple):
    """One fire the scheduler made: the schedule, the slot key, and the reply of its start."""

    schedule: str
    slot: str
    reply: dict[str, Any]


class Scheduler:
    """Starts the workflows of ``schedules`` at their slots; see the module."""

    def __init__(
        self,
        schedules: Sequence[ScheduleConfig],
        *,
        store: SQLiteStore,
        clock: Clock,
        fire: Fire,
        max_sleep: float = MAX_SLEEP,
        sync_poll: float = SYNC_POLL,
    ) -> None:
        self.schedules = list(schedules)
        self.store = store
        self.clock = clock
        self._fire = fire
        self.max_sleep = max_sleep
        self.sync_poll = sync_poll
        #: The wall time of the last check (None before the first one): the listing shows it.
        self.checked_at: float | None = None
        # A slot whose start was refused (an unknown type, data that does not fit): it is not
        # tried again at every wake; the next slot is.
        self._refused: dict[str, str] = {}

    async def tick(self) -> list[Fired]:
        """Fire what is due now (one read of the schedules' latest fires); the fires made."""
        if not self.schedules:
            return []
        wall, synchronized = self.clock.wall(), self.clock.synchronized()
        self.checked_at = wall
        if not synchronized:
            return []
        last = await self.store.last_fires(s.name for s in self.schedules)
        fired: list[Fired] = []
        for schedule in self.schedules:
            for slot in due_slots(
                schedule,
                self._last_slot(schedule, last.get(schedule.name)),
                wall,
                synchronized,
                _unfinished(last.get(schedule.name)),
            ):
                fired.append(await self._start(schedule, slot_key(slot)))
        return fired

    async def _start(self, schedule: ScheduleConfig, key: str) -> Fired:
        reply = await self._fire(schedule, key)
        if reply.get("ok"):
            log.info(
                "schedule %s: slot %s started workflow %s",
                schedule.name,
                key,
                reply.get("workflow_id"),
            )
        else:
            if reply.get("error", {}).get("code") not in _TRY_AGAIN:
                self._refused[schedule.name] = key  # its fault: not tried at every wake
            log.error(
                "schedule %s: slot %s started nothing: %s",
                schedule.name,
                key,
                reply.get("error", {}).get("message", reply),
            )
        return Fired(schedule.name, key, reply)

    def _last_slot(self, schedule: ScheduleConfig, fire: LastFire | None) -> datetime | None:
        keys = [k for k in (fire.slot if fire else None, self._refused.get(schedule.name)) if k]
        return slot_from_key(max(keys), schedule) if keys else None

    async def delay(self) -> float:
        """Seconds to sleep before the next check: until the next due slot of any schedule, at
        most :attr:`max_sleep` (:attr:`sync_poll` while the clock is not synchronized)."""
        if not self.clock.synchronized():
            return min(self.sync_poll, self.max_sleep)
        wall = self.clock.wall()
        last = await self.store.last_fires(s.name for s in self.schedules)
        soonest = self.max_sleep
        for schedule in self.schedules:
            due = next_due(schedule, self._last_slot(schedule, last.get(schedule.name)), wall)
            if due is not None:
                soonest = min(soonest, due.timestamp() - wall)
        return max(0.0, soonest)

    async def run(self) -> None:
        """Check, sleep, check again, until cancelled. A failing check (the store unreadable for
        a moment) is logged and tried again at the next wake."""
        if not self.schedules:
            return
        while True:
            try:
                await self.tick()
                pause = await self.delay()
            except Exception:
                log.exception("schedules: the check failed; trying again shortly")
                pause = self.max_sleep
            # A slot is whole seconds: wake just after it, so the wall clock reads it as passed.
            await asyncio.sleep(pause + 0.01 if pause < self.max_sleep else pause)

    async def listing(self) -> list[dict[str, Any]]:
        """What ``edgesaga schedules`` and ``cmd/schedules`` show; see :func:`schedule_rows`."""
        return await schedule_rows(self.schedules, self.store, self.clock, self.checked_at)


def _unfinished(fire: LastFire | None) -> bool:
    return fire is not None and fire.unfinished


def _iso(at: datetime) -> str:
    return at.isoformat()


def _utc(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def schedule_rows(
    schedules: Sequence[ScheduleConfig],
    store: SQLiteStore,
    clock: Clock,
    checked_at: float | None = None,
) -> list[dict[str, Any]]:
    """One row per schedule: its cron and zone, its next fire time (in its zone and in UTC; None
    while the clock is not synchronized, with ``waits_for_clock_sync``), and its last run (slot,
    workflow id and status; None before its first fire)."""
    wall, synchronized = clock.wall(), clock.synchronized()
    last = await store.last_fires(s.name for s in schedules)
    rows: list[dict[str, Any]] = []
    for schedule in schedules:
        fire = last.get(schedule.name)
        fired = slot_from_key(fire.slot, schedule) if fire else None
        due = next_due(schedule, fired, wall) if synchronized else None
        rows.append(
            {
                "name": schedule.name,
                "workflow_type": schedule.workflow_type,
                "cron": schedule.cron,
                "timezone": schedule.timezone,
                "missed": schedule.missed,
                "overlap": schedule.overlap,
                "next_fire": None if due is None else _iso(due),
                "next_fire_utc": None if due is None else _utc(due),
                "waits_for_clock_sync": not synchronized,
                "last_run": None
                if fire is None or fired is None
                else {
                    "slot": _iso(fired),
                    "slot_utc": fire.slot,
                    "workflow_id": fire.workflow_id,
                    "status": None if fire.status is None else fire.status.value,
                },
                "checked_at": None if checked_at is None else _utc_of(checked_at),
            }
        )
    return rows


def _utc_of(wall: float) -> str:
    return _utc(datetime.fromtimestamp(wall, UTC))
