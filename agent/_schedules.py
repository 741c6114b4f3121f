"""Schedules (DESIGN §11): their config, and pure decisions about which slot fires when.

A *slot* is one time a schedule's cron expression names, an aware ``datetime`` in the schedule's
zone. The agent records each fire as (schedule name, :func:`slot_key`) in the same transaction
that creates its workflow, so a slot never fires twice; :func:`due_slots` then needs only the
last fired slot, the wall clock and whether it is synchronized:

* nothing fires before the clock is synchronized;
* a slot at or before the last fired slot never fires again (a clock jump backwards over it);
* ``overlap: skip``: nothing starts while the schedule's previous run is unfinished; a slot that
  passes meanwhile counts as missed (below) once the run has finished;
* ``missed: run_once``: one run, for the latest slot since the last fire, however many passed;
* ``missed: skip``: only a slot at most :data:`ON_TIME_TOLERANCE` seconds old fires.

Cron expressions are read by cronsim (five fields, or six with the seconds first), which follows
Debian cron: see :func:`next_fire` for what it does at DST changes. Nothing here is wired into
the agent yet.
"""

# No `from __future__ import annotations`: pydantic evaluates the annotations at import.

import math
import re
from collections import Counter
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

MAX_SCHEDULES = 100
ON_TIME_TOLERANCE = 60.0
"""How late (seconds) a slot may be seen and still count as on time for ``missed: skip``: the
scheduler wakes at the slot, but a stalled loop, a slow SD card or a clock that syncs just after
the slot can make it see the slot a little late. Anything older is a missed slot."""

_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
_REFERENCE = datetime(2000, 1, 1, tzinfo=UTC)  # where a cron expression is first tried at load
_MAX_FOLD_STEPS = 1000  # cronsim results skipped in a repeated hour (60 at most: one per minute)


def _schedule_name(info: ValidationInfo) -> str:
    name = info.data.get("name")
    return f"schedule {name!r}" if isinstance(name, str) else "this schedule"


class ScheduleConfig(BaseModel):
    """One entry of ``schedules:`` in the agent config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(
        min_length=1,
        max_length=100,
        description="The schedule's own name (letters, digits, _ . -), unique in the config; "
        "its fires are recorded under it.",
    )
    workflow_type: str = Field(
        min_length=1,
        max_length=200,
        description="The workflow type each fire starts, as a `start` command would.",
    )
    cron: str = Field(
        min_length=1,
        max_length=200,
        description='When it fires: a cron expression such as "0 6 * * *" (five fields: minute, '
        "hour, day of month, month, day of week), or six with the seconds first.",
    )
    timezone: str = Field(
        min_length=1,
        max_length=100,
        description="The IANA time zone the cron expression is read in, such as Europe/Berlin "
        "or UTC.",
    )
    data: dict[str, Any] = Field(
        default_factory=lambda: {},  # a lambda: see StepDefinition
        max_length=1000,
        description="The input data of each workflow it starts.",
    )
    missed: Literal["skip", "run_once"] = Field(
        "skip",
        description="Slots that passed while the agent was down, its clock unsynchronized or "
        "the previous run unfinished: skip starts none of them, run_once starts one run for "
        "the latest.",
    )
    overlap: Literal["skip", "allow"] = Field(
        "skip",
        description="skip starts no run while this schedule's previous run is unfinished; "
        "allow starts it anyway.",
    )

    @field_validator("name", "workflow_type")
    @classmethod
    def _plain_name(cls, value: str, info: ValidationInfo) -> str:
        if not _NAME.fullmatch(value):
            raise PydanticCustomError(
                "schedule_name",
                "the schedule {field} {value} may hold only letters, digits, '_', '.' and '-'; "
                "rename it",
                {
                    "field": "name" if info.field_name == "name" else "workflow_type",
                    "value": repr(value),
                },
            )
        return value

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str, info: ValidationInfo) -> str:
        from cronsim import CronSim, CronSimError  # here: an agent without schedules never loads it

        who = _schedule_name(info)
        try:
            next(CronSim(value, _REFERENCE))
        except CronSimError as exc:
            raise PydanticCustomError(
                "cron",
                "{who} has the cron expression {cron}, which cronsim cannot read "
                "({reason}); write five fields such as '0 6 * * *'",
                {"who": who, "cron": repr(value), "reason": str(exc).lower()},
            ) from None
        except StopIteration:
            raise PydanticCustomError(
                "cron",
                "{who} has the cron expression {cron}, which never fires in 50 years; "
                "write one that does, such as '0 6 * * *'",
                {"who": who, "cron": repr(value)},
            ) from None
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str, info: ValidationInfo) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            raise PydanticCustomError(
                "timezone",
                "{who} has the timezone {zone}, which is not a known time zone; write an "
                "IANA name such as Europe/Berlin or UTC",
                {"who": _schedule_name(info), "zone": repr(value)},
            ) from None
        return value

    @property
    def zone(self) -> ZoneInfo:
        """The schedule's time zone (zoneinfo caches it)."""
        return ZoneInfo(self.timezone)


def _unique_names(schedules: list[ScheduleConfig]) -> list[ScheduleConfig]:
    twice = [n for n, count in Counter(s.name for s in schedules).items() if count > 1]
    if twice:
        raise PydanticCustomError(
            "schedule_name",
            "the schedule name {name} is given more than once; give each schedule its own name",
            {"name": repr(twice[0])},
        )
    return schedules


ScheduleList = Annotated[
    list[ScheduleConfig], Field(max_length=MAX_SCHEDULES), AfterValidator(_unique_names)
]
"""The type of the agent config's ``schedules:`` (at most :data:`MAX_SCHEDULES`, unique names)."""


def next_fire(schedule: ScheduleConfig, after: datetime) -> datetime | None:
    """The schedule's first slot strictly after ``after`` (an aware datetime), in its zone; None
    if cronsim finds none within 50 years.

    DST follows cronsim, which copies Debian cron. A five-field expression with a fixed minute
    and hour (neither starting with ``*``, such as ``30 2 * * *``) is read in local time: a slot
    in the spring-forward gap fires at the first minute after the gap (03:00 in Europe/Berlin),
    and a slot in the repeated fall-back hour fires once, at its first occurrence. Any other
    expression (``*/30 * * * *``, ``0 * * * *``, six fields) runs on real time: slots in the
    gap do not exist and slots in the repeated hour fire in both its passes."""
    if after.tzinfo is None:
        raise ValueError("next_fire needs an aware datetime; give it a time zone.")
    from cronsim import CronSim  # see _valid_cron

    floor = after.timestamp()
    slots = CronSim(schedule.cron, after.astimezone(schedule.zone))
    for _ in range(_MAX_FOLD_STEPS):
        try:
            slot = next(slots)
        except StopIteration:
            return None
        # In a repeated hour cronsim can name the first pass of a time after `after` read in the
        # second pass; such a slot lies before `after` and is skipped.
        if slot.timestamp() > floor:
            return slot
    return None


def latest_slot(schedule: ScheduleConfig, after: float, now: float) -> datetime | None:
    """The schedule's latest slot in ``(after, now]`` (wall seconds), or None.

    Bisection over :func:`next_fire` (a slot in ``(t, now]`` exists exactly while ``t`` is
    before the latest one), so a long outage of a busy schedule costs some 30 cron look-ups, not
    one per missed slot. Slots lie whole seconds apart, so a half-second bracket holds one."""
    if after >= now:
        return None

    def _slot_by(t: float) -> datetime | None:
        slot = next_fire(schedule, _at(t))
        return slot if slot is not None and slot.timestamp() <= now else None

    if _slot_by(after) is None:
        return None
    lo, hi = after, now  # a slot lies in (lo, now]; none in (hi, now]
    while hi - lo > 0.5:
        mid = (lo + hi) / 2
        if _slot_by(mid) is None:
            hi = mid
        else:
            lo = mid
    return _slot_by(lo)


def due_slots(
    schedule: ScheduleConfig,
    last_fired_slot: datetime | None,
    now_wall: float,
    synchronized: bool,
    previous_run_unfinished: bool,
    *,
    tolerance: float = ON_TIME_TOLERANCE,
) -> list[datetime]:
    """The slots that fire now: none, or one (see the module's rules). A schedule that has never
    fired (``last_fired_slot`` None) has missed nothing: only an on-time slot fires."""
    if not synchronized:
        return []
    if previous_run_unfinished and schedule.overlap == "skip":
        return []
    on_time = now_wall - tolerance  # the oldest slot time that still counts as on time
    only_on_time = last_fired_slot is None or schedule.missed == "skip"
    after = -math.inf if last_fired_slot is None else last_fired_slot.timestamp()
    if only_on_time:
        after = max(after, on_time - 1.0)  # slots lie whole seconds apart
    slot = latest_slot(schedule, after, now_wall)
    if slot is None or (only_on_time and slot.timestamp() < on_time):
        return []
    return [slot]


def next_due(
    schedule: ScheduleConfig, last_fired_slot: datetime | None, now_wall: float
) -> datetime | None:
    """When the scheduler should look again: the first slot after both ``now_wall`` and the last
    fired slot (after a clock jump backwards, slots up to the fired one never fire again). This
    is also what ``edgesaga schedules`` lists as the next fire time."""
    after = now_wall if last_fired_slot is None else max(now_wall, last_fired_slot.timestamp())
    return next_fire(schedule, _at(after))


def slot_key(slot: datetime) -> str:
    """How a slot is stored beside the schedule's name: UTC, ISO 8601, to the second
    (``2026-12-01T05:00:00Z``), so the key of one instant is the same whatever its zone."""
    return slot.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def slot_from_key(key: str, schedule: ScheduleConfig) -> datetime:
    """The stored slot back as an aware datetime in the schedule's zone."""
    return datetime.fromisoformat(key).astimezone(schedule.zone)


def _at(wall: float) -> datetime:
    return datetime.fromtimestamp(wall, UTC)
