"""Schedules (agent._schedules, DESIGN §11): the config and which slot fires when.

Time comes from an injected :class:`FakeClock` or from plain datetimes; a tiny scheduler loop in
this file plays the agent's part (ask :func:`due_slots`, record the fire), so "never twice" and
"not across a jump backwards" are checked over many polls, not one call.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from agent._clock import FakeClock, read_clock
from agent._schedules import (
    MAX_SCHEDULES,
    ON_TIME_TOLERANCE,
    ScheduleConfig,
    ScheduleList,
    due_slots,
    latest_slot,
    next_due,
    next_fire,
    slot_from_key,
    slot_key,
)

BERLIN = ZoneInfo("Europe/Berlin")
HOUR = 3600.0
DAY = 86_400.0


def _schedule(**changes: Any) -> ScheduleConfig:
    fields: dict[str, Any] = {
        "name": "water",
        "workflow_type": "irrigation",
        "cron": "0 6 * * *",
        "timezone": "Europe/Berlin",
    }
    fields.update(changes)
    return ScheduleConfig.model_validate(fields)


def _berlin(
    year: int, month: int, day: int, hour: int, minute: int, second: int = 0, *, fold: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=BERLIN, fold=fold)


def _t(year: int, month: int, day: int, hour: int, minute: int, second: int = 0) -> float:
    return _berlin(year, month, day, hour, minute, second).timestamp()


class _Scheduler:
    """The agent's part in miniature: poll, fire what is due, record it (as one transaction
    would, with the workflow), and keep the run unfinished for as long as a test says."""

    def __init__(self, schedule: ScheduleConfig, clock: FakeClock) -> None:
        self.schedule = schedule
        self.clock = clock
        self.fired: list[datetime] = []
        self.running = False

    @property
    def last(self) -> datetime | None:
        return self.fired[-1] if self.fired else None

    def poll(self) -> list[datetime]:
        r = read_clock(self.clock)
        due = due_slots(self.schedule, self.last, r.wall, r.synchronized, self.running)
        self.fired.extend(due)
        return due

    def run_for(self, seconds: float, step: float = 10.0) -> None:
        """Poll every ``step`` seconds of real time for ``seconds``."""
        for _ in range(int(seconds / step)):
            self.clock.advance(step)
            self.poll()


def _clock_at(wall: float, synchronized: bool = True) -> FakeClock:
    return FakeClock(wall=wall, synchronized=synchronized)


# --- firing ----------------------------------------------------------------------------------


def test_a_slot_fires_on_time_and_not_a_second_before() -> None:
    s = _schedule()
    assert due_slots(s, None, _t(2026, 12, 1, 5, 59, 59), True, False) == []
    assert due_slots(s, None, _t(2026, 12, 1, 6, 0), True, False) == [_berlin(2026, 12, 1, 6, 0)]
    assert due_slots(s, None, _t(2026, 12, 1, 6, 0, 30), True, False) == [
        _berlin(2026, 12, 1, 6, 0)
    ]


def test_polling_through_a_morning_fires_each_slot_exactly_once() -> None:
    sched = _Scheduler(_schedule(), _clock_at(_t(2026, 12, 1, 5, 0)))
    sched.run_for(2 * DAY, step=30)
    assert sched.fired == [_berlin(2026, 12, 1, 6, 0), _berlin(2026, 12, 2, 6, 0)]


def test_nothing_fires_before_the_clock_is_synchronized() -> None:
    s = _schedule()
    assert due_slots(s, None, _t(2026, 12, 1, 6, 0), False, False) == []
    sched = _Scheduler(s, _clock_at(_t(2026, 12, 1, 5, 59), synchronized=False))
    sched.run_for(10 * 60)
    assert sched.fired == []
    sched.clock.set(synchronized=True)  # synced 11 min after the slot: skip drops it
    assert sched.poll() == []


def test_a_sync_just_after_the_slot_still_fires_it_as_on_time() -> None:
    sched = _Scheduler(_schedule(), _clock_at(_t(2026, 12, 1, 5, 59, 50), synchronized=False))
    sched.run_for(30)
    assert sched.fired == []
    sched.clock.set(synchronized=True)
    assert sched.poll() == [_berlin(2026, 12, 1, 6, 0)]


def test_run_once_starts_one_run_for_all_slots_missed_in_an_outage() -> None:
    s = _schedule(missed="run_once")
    last = _berlin(2026, 11, 27, 6, 0)  # then down for four days and three hours
    now = _t(2026, 12, 1, 9, 0)
    assert due_slots(s, last, now, True, False) == [_berlin(2026, 12, 1, 6, 0)]
    assert due_slots(s, _berlin(2026, 12, 1, 6, 0), now, True, False) == []


def test_run_once_after_a_reboot_waits_for_the_sync_then_fires_once() -> None:
    clock = _clock_at(_t(2026, 11, 30, 6, 0))
    sched = _Scheduler(_schedule(missed="run_once"), clock)
    assert sched.poll() == [_berlin(2026, 11, 30, 6, 0)]
    clock.reboot(wall=_t(2026, 11, 30, 6, 5))  # down a day; boots with the saved time
    sched.run_for(HOUR)
    assert sched.fired == [_berlin(2026, 11, 30, 6, 0)]
    clock.set(wall=_t(2026, 12, 1, 8, 0), synchronized=True)
    assert sched.poll() == [_berlin(2026, 12, 1, 6, 0)]
    sched.run_for(HOUR)
    assert sched.fired == [_berlin(2026, 11, 30, 6, 0), _berlin(2026, 12, 1, 6, 0)]


def test_skip_starts_none_of_the_slots_missed_in_an_outage() -> None:
    s = _schedule(missed="skip")
    last = _berlin(2026, 11, 27, 6, 0)
    assert due_slots(s, last, _t(2026, 12, 1, 9, 0), True, False) == []
    for over in (0.5, 1.0):  # just past the tolerance, also between two whole seconds
        late = _t(2026, 12, 1, 6, 0) + ON_TIME_TOLERANCE + over
        assert due_slots(s, last, late, True, False) == []
        assert due_slots(s, None, late, True, False) == []
    # back up within the tolerance of today's slot: that one is on time, the others stay missed
    soon = _t(2026, 12, 1, 6, 0) + ON_TIME_TOLERANCE
    assert due_slots(s, last, soon, True, False) == [_berlin(2026, 12, 1, 6, 0)]


def test_a_restart_after_the_fire_does_not_fire_the_slot_again() -> None:
    clock = _clock_at(_t(2026, 12, 1, 5, 59, 55))
    first = _Scheduler(_schedule(missed="run_once"), clock)
    first.run_for(60, step=5)
    assert first.fired == [_berlin(2026, 12, 1, 6, 0)]
    # a new agent process reads the same record back (the stored slot key) and polls on
    again = _Scheduler(first.schedule, clock)
    again.fired = [slot_from_key(slot_key(first.fired[0]), first.schedule)]
    again.run_for(HOUR)
    assert again.fired == first.fired


@pytest.mark.parametrize("missed", ["skip", "run_once"])
def test_a_clock_jump_backwards_over_a_fired_slot_fires_nothing(missed: str) -> None:
    clock = _clock_at(_t(2026, 12, 1, 5, 59))
    sched = _Scheduler(_schedule(missed=missed), clock)
    sched.run_for(5 * 60)
    assert sched.fired == [_berlin(2026, 12, 1, 6, 0)]
    clock.jump_wall(-DAY)  # 05:04 yesterday, still synchronized
    sched.run_for(DAY + 60 * 60)  # through yesterday's 06:00 and today's again
    assert sched.fired == [_berlin(2026, 12, 1, 6, 0)]
    sched.run_for(DAY)  # tomorrow's is new
    assert sched.fired == [_berlin(2026, 12, 1, 6, 0), _berlin(2026, 12, 2, 6, 0)]


# --- overlap ---------------------------------------------------------------------------------


def test_overlap_skip_starts_nothing_while_the_previous_run_is_unfinished() -> None:
    now = _t(2026, 12, 1, 6, 0, 5)
    yesterday = _berlin(2026, 11, 30, 6, 0)
    assert due_slots(_schedule(overlap="skip"), yesterday, now, True, True) == []
    assert due_slots(_schedule(overlap="allow"), yesterday, now, True, True) == [
        _berlin(2026, 12, 1, 6, 0)
    ]


@pytest.mark.parametrize(("missed", "fired"), [("skip", 0), ("run_once", 1)])
def test_a_slot_passed_over_for_an_unfinished_run_counts_as_missed(missed: str, fired: int) -> None:
    clock = _clock_at(_t(2026, 11, 30, 5, 59))
    sched = _Scheduler(_schedule(missed=missed), clock)
    sched.run_for(60)
    sched.running = True  # yesterday's run takes a day and ten minutes
    sched.run_for(DAY + 10 * 60)
    assert sched.fired == [_berlin(2026, 11, 30, 6, 0)]
    sched.running = False
    sched.run_for(60)
    assert sched.fired[1:] == [_berlin(2026, 12, 1, 6, 0)] * fired


# --- DST in Europe/Berlin, as cronsim documents it (Debian cron) ------------------------------


def test_spring_forward_a_fixed_time_in_the_gap_fires_at_the_end_of_the_gap() -> None:
    s = _schedule(cron="30 2 * * *")
    assert next_fire(s, _berlin(2026, 3, 28, 3, 0)) == _berlin(2026, 3, 29, 3, 0)
    assert next_fire(s, _berlin(2026, 3, 29, 3, 0)) == _berlin(2026, 3, 30, 2, 30)
    sched = _Scheduler(s, _clock_at(_t(2026, 3, 29, 1, 0)))
    sched.run_for(4 * HOUR, step=60)
    assert [slot_key(f) for f in sched.fired] == ["2026-03-29T01:00:00Z"]  # 03:00 CEST


def test_spring_forward_a_stepped_expression_has_no_slots_in_the_gap() -> None:
    s = _schedule(cron="*/30 * * * *")
    assert next_fire(s, _berlin(2026, 3, 29, 1, 30)) == _berlin(2026, 3, 29, 3, 0)


def test_fall_back_a_fixed_time_fires_once_at_its_first_pass() -> None:
    s = _schedule(cron="30 2 * * *")
    first = next_fire(s, _berlin(2026, 10, 25, 0, 0))
    assert first == _berlin(2026, 10, 25, 2, 30)
    assert first is not None
    assert first.utcoffset() == timedelta(hours=2)
    assert next_fire(s, first) == _berlin(2026, 10, 26, 2, 30)
    sched = _Scheduler(s, _clock_at(_t(2026, 10, 25, 0, 0)))
    sched.run_for(5 * HOUR, step=60)
    assert [slot_key(f) for f in sched.fired] == ["2026-10-25T00:30:00Z"]


def test_fall_back_next_fire_from_the_second_pass_never_goes_back_to_the_first() -> None:
    """cronsim reads 02:10 of the second pass (CET) as a local 02:10 and names 02:30 of the first
    pass (CEST), 40 minutes *before* it; next_fire skips that and names tomorrow's."""
    s = _schedule(cron="30 2 * * *")
    second_pass = _berlin(2026, 10, 25, 2, 10, fold=1)
    got = next_fire(s, second_pass)
    assert got is not None
    assert got.timestamp() > second_pass.timestamp()
    assert got == _berlin(2026, 10, 26, 2, 30)


def test_fall_back_an_hourly_expression_fires_in_both_passes_of_the_repeated_hour() -> None:
    sched = _Scheduler(_schedule(cron="0 * * * *"), _clock_at(_t(2026, 10, 25, 1, 30)))
    sched.run_for(3 * HOUR, step=60)
    assert [slot_key(f) for f in sched.fired] == [
        "2026-10-25T00:00:00Z",  # 02:00 CEST
        "2026-10-25T01:00:00Z",  # 02:00 CET
        "2026-10-25T02:00:00Z",  # 03:00 CET
    ]


# --- the search for the latest slot ------------------------------------------------------------


def test_a_busy_schedule_after_a_year_down_runs_once_for_the_latest_second() -> None:
    s = _schedule(cron="* * * * * *", missed="run_once")  # every second
    now = _t(2026, 12, 1, 6, 0, 7) + 0.25
    got = due_slots(s, _berlin(2025, 12, 1, 6, 0), now, True, False)
    assert got == [_berlin(2026, 12, 1, 6, 0, 7)]


CRONS = ["0 6 * * *", "*/7 * * * *", "30 2 * * *", "0 * * * *", "15 1-3 * * 0", "*/20 * * * * *"]


@settings(max_examples=150, deadline=None)
@given(
    cron=st.sampled_from(CRONS),
    zone=st.sampled_from(["Europe/Berlin", "UTC", "America/New_York", "Australia/Lord_Howe"]),
    start=st.floats(_t(2026, 3, 26, 0, 0), _t(2026, 11, 3, 0, 0)),
    span=st.floats(0, 2 * DAY),
)
def test_the_latest_slot_is_the_last_one_walking_forward_finds(
    cron: str, zone: str, start: float, span: float
) -> None:
    s = _schedule(cron=cron, timezone=zone)
    now = start + span
    walked = None
    slot = next_fire(s, datetime.fromtimestamp(start, UTC))
    while slot is not None and slot.timestamp() <= now:
        walked = slot
        slot = next_fire(s, slot)
    assert latest_slot(s, start, now) == walked


def test_next_due_is_after_the_fired_slot_when_the_clock_went_back() -> None:
    s = _schedule()
    fired = _berlin(2026, 12, 1, 6, 0)
    assert next_due(s, fired, _t(2026, 11, 30, 5, 0)) == _berlin(2026, 12, 2, 6, 0)
    assert next_due(s, None, _t(2026, 11, 30, 5, 0)) == _berlin(2026, 11, 30, 6, 0)


def test_next_fire_refuses_a_naive_datetime() -> None:
    with pytest.raises(ValueError, match="aware datetime"):
        next_fire(_schedule(), datetime(2026, 12, 1, 6, 0))


def test_a_slot_key_names_the_instant_whatever_the_zone() -> None:
    s = _schedule()
    slot = _berlin(2026, 12, 1, 6, 0)
    assert slot_key(slot) == slot_key(slot.astimezone(UTC)) == "2026-12-01T05:00:00Z"
    assert slot_from_key(slot_key(slot), s) == slot
    cest = _berlin(2026, 10, 25, 2, 0)
    cet = _berlin(2026, 10, 25, 2, 0, fold=1)
    assert slot_key(cest) != slot_key(cet)
    assert slot_from_key(slot_key(cet), s).timestamp() == cet.timestamp()


# --- config --------------------------------------------------------------------------------------


def _error(fields: dict[str, Any]) -> tuple[str, str]:
    base: dict[str, Any] = {
        "name": "water",
        "workflow_type": "irrigation",
        "cron": "0 6 * * *",
        "timezone": "Europe/Berlin",
    }
    with pytest.raises(ValidationError) as info:
        ScheduleConfig.model_validate({**base, **fields})
    first = info.value.errors()[0]
    return ".".join(str(x) for x in first["loc"]), first["msg"]


def _one_sentence(message: str) -> None:
    assert "\n" not in message
    assert ". " not in message
    assert not message.endswith(".")  # the config loader ends it: "{file}: {key}: {msg}."
    assert "; " in message  # what is wrong; what to do


@pytest.mark.parametrize(
    ("fields", "key", "words"),
    [
        ({"cron": "61 6 * * *"}, "cron", ["'water'", "'61 6 * * *'", "bad minute", "five fields"]),
        ({"cron": "0 6 * *"}, "cron", ["'water'", "wrong number of fields"]),
        ({"cron": "* * */20 * 1L"}, "cron", ["'water'", "never fires"]),
        ({"timezone": "Europe/Berln"}, "timezone", ["'water'", "'Europe/Berln'", "IANA"]),
        ({"timezone": "../etc/passwd"}, "timezone", ["'water'", "not a known time zone"]),
        ({"name": "wa ter"}, "name", ["'wa ter'", "rename it"]),
        ({"workflow_type": "a/b"}, "workflow_type", ["workflow_type", "'a/b'"]),
        ({"name": "water\n"}, "name", ["rename it"]),
    ],
)
def test_a_config_error_is_one_sentence_naming_the_schedule_and_the_field(
    fields: dict[str, Any], key: str, words: list[str]
) -> None:
    loc, message = _error(fields)
    assert loc == key
    _one_sentence(message)
    for word in words:
        assert word in message


def test_config_defaults_and_unknown_keys() -> None:
    s = _schedule()
    assert (s.missed, s.overlap, s.data) == ("skip", "skip", {})
    assert s.zone == BERLIN
    loc, _ = _error({"catchup": True})
    assert loc == "catchup"
    loc, _ = _error({"missed": "all"})
    assert loc == "missed"
    for name, field in ScheduleConfig.model_fields.items():
        assert field.description, name


def test_the_list_is_bounded_and_its_names_unique() -> None:
    adapter: TypeAdapter[list[ScheduleConfig]] = TypeAdapter(ScheduleList)
    one = {"name": "a", "workflow_type": "w", "cron": "0 6 * * *", "timezone": "UTC"}
    with pytest.raises(ValidationError) as info:
        adapter.validate_python([one, {**one, "cron": "0 7 * * *"}])
    message = info.value.errors()[0]["msg"]
    _one_sentence(message)
    assert "'a'" in message
    many = [{**one, "name": f"s{i}"} for i in range(MAX_SCHEDULES + 1)]
    with pytest.raises(ValidationError, match="at most 100"):
        adapter.validate_python(many)
    assert len(adapter.validate_python(many[:MAX_SCHEDULES])) == MAX_SCHEDULES
