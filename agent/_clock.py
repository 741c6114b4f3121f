"""Time you can trust on a board without a real-time clock (DESIGN §11): the clock and pure timer rules.

A Raspberry Pi boots with the wall time it last saved (or 1970) and jumps when NTP syncs, so a
durable timer cannot live on the wall clock alone. Each timer keeps a :class:`TimerMark`: its wall
deadline and whether the clock was synchronized when it was armed, the kernel boot id with a
``CLOCK_BOOTTIME`` deadline, and the time it had left at the last checkpoint. The functions here
decide over one :class:`ClockReading` taken at once, so every decision is pure and testable
without sleeping:

* :func:`arm` a timer; :func:`checkpoint` it now and then (the remaining time is what survives a
  reboot); :func:`rebase` it once when the agent starts again; :func:`decide` whether it is due.
* Same boot (the agent restarted): the boot-time deadline rules; a wall jump changes nothing.
* After a reboot: while the clock was synchronized when armed *and* is synchronized now, the wall
  deadline rules; otherwise the timer waits its remaining time counted from the first reading of
  this boot, and is re-checked against the wall deadline as soon as the clock syncs.
* :class:`Late` only when the deadline had already passed when the agent started (it was down);
  a deadline that passes while the agent runs is :class:`Due`. Never early, on any path.

The engine's DELAY step arms and decides these marks; ``agent._timers.TimerService`` wakes the
waiting workflows.
"""

# No `from __future__ import annotations`: pydantic evaluates ClockConfig's annotations at import.

import os
import re
import time
import uuid
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from datetime import time as time_of_day
from typing import NamedTuple, Protocol
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_SYNC_FILE = "/run/systemd/timesync/synchronized"
BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"
#: Seconds between looks at the clock's sync by a DELAY waiting without a timer service (the CLI).
SYNC_RECHECK = 1.0
MAX_UNTIL_LENGTH = 64  # the longest `until:` text accepted (an ISO-8601 date-time is ~32)

# Without a kernel boot id (not Linux, or /proc not mounted) every process counts as a boot of its
# own. That is the safe direction: a restart then waits its remaining time again (late, never
# early), whereas one id for all boots would compare boot-time deadlines across reboots.
_PROCESS_BOOT_ID = f"process-{uuid.uuid4()}"


class Clock(Protocol):
    """Where the agent reads time. :class:`SystemClock` in the agent, :class:`FakeClock` in tests."""

    def wall(self) -> float:
        """Seconds since the epoch by the wall clock (``time.time``); may jump either way."""
        ...

    def boottime(self) -> float:
        """Seconds since this boot began (``CLOCK_BOOTTIME``: counts suspend, never jumps)."""
        ...

    def boot_id(self) -> str:
        """An id that changes at every boot, and only then (or more often, never less)."""
        ...

    def synchronized(self) -> bool:
        """Whether the wall clock is known to be right (NTP synced, or a board with an RTC)."""
        ...


class ClockConfig(BaseModel):
    """The ``clock:`` section of the agent config: how the agent knows its wall clock is right."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sync_file: str = Field(
        DEFAULT_SYNC_FILE,
        min_length=1,
        max_length=4096,
        description=(
            "A file whose existence means the wall clock is synchronized; systemd-timesyncd "
            "creates the default one at its first sync after each boot."
        ),
    )
    assume_synchronized: bool = Field(
        False,
        description=(
            "Treat the wall clock as always synchronized (a board with a battery-backed "
            "real-time clock); sync_file is then not looked at."
        ),
    )


class SystemClock:
    """The real clock: ``time.time``, ``CLOCK_BOOTTIME``, the kernel boot id and the sync file."""

    def __init__(
        self, *, sync_file: str = DEFAULT_SYNC_FILE, assume_synchronized: bool = False
    ) -> None:
        if not sync_file:
            raise ValueError("sync_file is empty; give the path of the clock's sync file.")
        self._sync_file = sync_file
        self._assume = assume_synchronized
        self._boot_id = _read_boot_id()
        # The boot id and the boot-time clock must belong together: a per-process id goes with
        # a per-process clock (monotonic), never with a kernel clock that outlives the process.
        kernel = self._boot_id != _PROCESS_BOOT_ID and hasattr(time, "CLOCK_BOOTTIME")
        self._clock_id = time.CLOCK_BOOTTIME if kernel else time.CLOCK_MONOTONIC

    @classmethod
    def from_config(cls, config: ClockConfig) -> "SystemClock":
        """The clock the ``clock:`` section describes."""
        return cls(sync_file=config.sync_file, assume_synchronized=config.assume_synchronized)

    def wall(self) -> float:
        return time.time()

    def boottime(self) -> float:
        return time.clock_gettime(self._clock_id)

    def boot_id(self) -> str:
        return self._boot_id

    def synchronized(self) -> bool:
        return self._assume or os.path.exists(self._sync_file)


def _read_boot_id(path: str = BOOT_ID_FILE) -> str:
    """The kernel's boot id, or this process's own id when the kernel gives none."""
    try:
        with open(path, encoding="ascii") as f:
            text = f.read(100).strip()
    except (OSError, UnicodeDecodeError):
        return _PROCESS_BOOT_ID
    return text or _PROCESS_BOOT_ID


class FakeClock:
    """A clock for tests: every value settable; real time passes only when a test says so."""

    def __init__(
        self,
        *,
        wall: float = 1_800_000_000.0,
        boottime: float = 100.0,
        boot_id: str = "boot-1",
        synchronized: bool = True,
    ) -> None:
        self._wall = wall
        self._boottime = boottime
        self._boot_id = boot_id
        self._synchronized = synchronized
        self._boots = 1

    def wall(self) -> float:
        return self._wall

    def boottime(self) -> float:
        return self._boottime

    def boot_id(self) -> str:
        return self._boot_id

    def synchronized(self) -> bool:
        return self._synchronized

    def set(
        self,
        *,
        wall: float | None = None,
        boottime: float | None = None,
        boot_id: str | None = None,
        synchronized: bool | None = None,
    ) -> None:
        """Set any of the four values; the others stay."""
        if wall is not None:
            self._wall = wall
        if boottime is not None:
            self._boottime = boottime
        if boot_id is not None:
            self._boot_id = boot_id
        if synchronized is not None:
            self._synchronized = synchronized

    def advance(self, seconds: float) -> None:
        """Real time passes: the wall and the boot-time clock both move on."""
        if seconds < 0:
            raise ValueError(
                "advance() takes a non-negative number of seconds; real time never runs back."
            )
        self._wall += seconds
        self._boottime += seconds

    def jump_wall(self, seconds: float) -> None:
        """The wall clock jumps (either way), as when NTP steps it; no real time passes."""
        self._wall += seconds

    def reboot(
        self,
        *,
        wall: float | None = None,
        synchronized: bool = False,
        boot_id: str | None = None,
        boottime: float = 0.0,
    ) -> None:
        """A new boot: a new boot id, the boot-time clock from ``boottime``, the clock not
        synchronized unless told; the wall stays where it was (the last saved time) unless given."""
        self._boots += 1
        self._boot_id = boot_id if boot_id is not None else f"boot-{self._boots}"
        self._boottime = boottime
        self._synchronized = synchronized
        if wall is not None:
            self._wall = wall


class ClockReading(NamedTuple):
    """The clock, read once: every decision about a timer takes one reading."""

    wall: float
    boottime: float
    boot_id: str
    synchronized: bool


def read_clock(clock: Clock) -> ClockReading:
    """Read all four values of ``clock`` once."""
    return ClockReading(clock.wall(), clock.boottime(), clock.boot_id(), clock.synchronized())


class TimerMark(NamedTuple):
    """What a durable timer stores (a row's worth of plain values; ``_asdict()`` for JSON)."""

    wall_deadline: float  # wall seconds at which it is due, by the clock when armed
    synchronized: bool  # whether the wall clock was synchronized when the timer was armed
    boot_id: str  # the boot that boottime_deadline and since count in
    boottime_deadline: float  # CLOCK_BOOTTIME at which it is due in that boot (a lower bound)
    remaining: float  # seconds it had left at the last checkpoint (what survives a reboot)
    since: float  # CLOCK_BOOTTIME when this agent run first saw it (arming or recovery)
    rebooted: bool  # boot_id is a later boot than the one it was armed in
    needs_sync: bool = False  # an `until:` timer: fires only on a synchronized clock


@dataclass(frozen=True, slots=True)
class Due:
    """The timer is due now: go on."""


@dataclass(frozen=True, slots=True)
class Wait:
    """Not yet: decide again in ``seconds`` (by the boot-time clock), or when the clock syncs."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Late:
    """The deadline passed while the agent was down, ``by`` seconds ago: ``on_late`` decides."""

    by: float


@dataclass(frozen=True, slots=True)
class NeedsSync:
    """It cannot be decided before the wall clock is synchronized (an ``until:`` time); decide
    again when it syncs."""


Decision = Due | Wait | Late | NeedsSync


def arm(reading: ClockReading, seconds: float, *, needs_sync: bool = False) -> TimerMark:
    """A timer due ``seconds`` from ``reading`` (a negative duration counts as 0)."""
    seconds = max(0.0, seconds)
    return TimerMark(
        wall_deadline=reading.wall + seconds,
        synchronized=reading.synchronized,
        boot_id=reading.boot_id,
        boottime_deadline=reading.boottime + seconds,
        remaining=seconds,
        since=reading.boottime,
        rebooted=False,
        needs_sync=needs_sync,
    )


def rebase(mark: TimerMark, reading: ClockReading) -> TimerMark:
    """The mark as this agent run first sees it; call once per timer on recovery, and store it.

    After a reboot the old boot-time deadline means nothing: the new one is the remaining time
    counted from this reading, and the wall deadline takes over once both ends are synchronized.
    On the same boot the deadlines stand; only ``since`` moves, so a deadline that passed while
    the agent was down is :class:`Late` and one that passes from now on is :class:`Due`."""
    if reading.boot_id == mark.boot_id:
        return mark._replace(since=reading.boottime)
    return mark._replace(
        boot_id=reading.boot_id,
        boottime_deadline=reading.boottime + mark.remaining,
        since=reading.boottime,
        rebooted=True,
    )


class Stamp(NamedTuple):
    """When something happened, by all four clock values (a step's completion, for
    ``max_lateness``)."""

    wall: float
    boottime: float
    boot_id: str
    synchronized: bool


def elapsed(since: Stamp, reading: ClockReading) -> float | None:
    """Seconds from ``since`` to ``reading``: by the boot-time clock on the same boot; across a
    reboot by the wall clock when it was synchronized at both ends; else None (unknown)."""
    if since.boot_id == reading.boot_id:
        return max(0.0, reading.boottime - since.boottime)
    if since.synchronized and reading.synchronized:
        return max(0.0, reading.wall - since.wall)
    return None


def _wall_rules(mark: TimerMark, reading: ClockReading) -> bool:
    """After a reboot the wall deadline rules only when the clock was right at both ends."""
    return mark.rebooted and mark.synchronized and reading.synchronized


def _same_boot(mark: TimerMark, reading: ClockReading) -> None:
    if reading.boot_id != mark.boot_id:
        raise ValueError(
            "This timer mark belongs to another boot; rebase() it onto the current reading first."
        )


def decide(mark: TimerMark, reading: ClockReading) -> Decision:
    """Whether the timer is due at ``reading``: :class:`Due`, :class:`Wait`, :class:`Late` or
    :class:`NeedsSync` (DESIGN §11). ``mark`` must be rebased onto this boot (:func:`rebase`)."""
    _same_boot(mark, reading)
    if mark.needs_sync and not reading.synchronized:
        return NeedsSync()
    if _wall_rules(mark, reading):
        left = mark.wall_deadline - reading.wall
        # The wall at this run's first sighting, by the boot-time clock that never jumps.
        first_seen = reading.wall - (reading.boottime - mark.since)
        passed_while_down = mark.wall_deadline < first_seen
    else:
        left = mark.boottime_deadline - reading.boottime
        passed_while_down = mark.boottime_deadline < mark.since
    if left > 0:
        return Wait(left)
    return Late(-left) if passed_while_down else Due()


def waits_on_sync(mark: TimerMark, reading: ClockReading) -> bool:
    """Whether the clock's sync would change this timer's decision: an ``until:`` timer on an
    unsynchronized clock, or a rebooted one armed on a synchronized clock whose wall deadline
    takes over at the sync. The agent's status counts these; the timer service decides them
    again when the sync file appears."""
    if reading.synchronized:
        return False
    return mark.needs_sync or (mark.rebooted and mark.synchronized)


def checkpoint(mark: TimerMark, reading: ClockReading) -> TimerMark:
    """The mark with the time it has left at ``reading``: store it now and then, so that after a
    power cut the timer waits no longer than needed (and never less: time only passes after it)."""
    _same_boot(mark, reading)
    if _wall_rules(mark, reading):
        left = mark.wall_deadline - reading.wall
    else:
        left = mark.boottime_deadline - reading.boottime
    return mark._replace(remaining=max(0.0, left))


_TIME_OF_DAY = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)(?::([0-5]\d))?$")


def parse_until(text: str) -> time_of_day | datetime:
    """``until:`` as a time of day (``"06:30"``, ``"06:30:15"``) or an ISO-8601 date and time
    (``"2026-12-02T06:30:00+01:00"``; without an offset it is read in the timer's time zone).
    Raises ValueError with one sentence; the definition loader calls it at load time."""
    if len(text) > MAX_UNTIL_LENGTH:
        raise ValueError(
            f"until is longer than {MAX_UNTIL_LENGTH} characters; write HH:MM or an ISO-8601 date and time."
        )
    m = _TIME_OF_DAY.match(text)
    if m:
        return time_of_day(int(m[1]), int(m[2]), int(m[3] or 0))
    try:
        if "T" not in text and " " not in text:
            raise ValueError
        return datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"until {text!r} is neither a time of day HH:MM nor an ISO-8601 date and time such "
            "as 2026-12-02T06:30:00+01:00; write one of those."
        ) from None


def until(reading: ClockReading, when: str, tz: ZoneInfo) -> float | NeedsSync:
    """The wall deadline of ``until: when`` in zone ``tz``: the next such time of day after
    ``reading`` (tomorrow if it has passed today), or the given date and time. Refuses with
    :class:`NeedsSync` while the clock is not synchronized: a wrong wall clock gives a wrong day.

    A time of day in a DST gap (02:30 on the spring-forward night in Europe/Berlin) is read with
    the offset before the change (PEP 495, ``fold=0``), so it falls an hour later (03:30); in a
    repeated hour the first of the two is meant. The result may lie in the past for a date and
    time; :func:`arm_until` then arms a timer that is due at once."""
    if not reading.synchronized:
        return NeedsSync()
    target = parse_until(when)
    if isinstance(target, datetime):
        return (target if target.tzinfo else target.replace(tzinfo=tz)).timestamp()
    today: date = datetime.fromtimestamp(reading.wall, tz).date()
    deadline = datetime.combine(today, target, tzinfo=tz).timestamp()
    if deadline > reading.wall:
        return deadline
    # Tomorrow's is always ahead: it is no earlier than tomorrow's local midnight.
    return datetime.combine(today + timedelta(days=1), target, tzinfo=tz).timestamp()


def arm_until(reading: ClockReading, when: str, tz: ZoneInfo) -> TimerMark | NeedsSync:
    """A timer for ``until: when`` (see :func:`until`), firing only on a synchronized clock."""
    deadline = until(reading, when, tz)
    if isinstance(deadline, NeedsSync):
        return deadline
    mark = arm(reading, deadline - reading.wall, needs_sync=True)
    return mark._replace(wall_deadline=max(deadline, reading.wall))


def local_zone() -> ZoneInfo:
    """The board's local time zone: ``$TZ``, else ``/etc/localtime``'s zone name, else UTC."""
    names = [os.environ.get("TZ", "").lstrip(":")]
    try:
        target = os.path.realpath("/etc/localtime")
        if "zoneinfo/" in target:
            names.append(target.split("zoneinfo/", 1)[1])
    except OSError:
        pass
    for name in names:
        if name:
            try:
                return ZoneInfo(name)
            except (ValueError, KeyError, OSError):
                continue
    return ZoneInfo("UTC")
