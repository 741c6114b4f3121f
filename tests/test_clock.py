"""The clock rules of DESIGN §11 (agent._clock): durable timers over an injected clock.

Every case takes readings of a :class:`FakeClock`; real time passes only through ``advance``, so
no test sleeps. The table covers same boot / reboot, synchronized at arming or not,
synchronized now or not; a hypothesis property drives random restarts, reboots, wall jumps and
syncs and checks that a timer never fires before its time has really passed.
"""

from __future__ import annotations

import math
import os
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from agent._clock import (
    DEFAULT_SYNC_FILE,
    ClockConfig,
    ClockReading,
    Decision,
    Due,
    FakeClock,
    Late,
    NeedsSync,
    SystemClock,
    TimerMark,
    Wait,
    _read_boot_id,
    arm,
    arm_until,
    checkpoint,
    decide,
    parse_until,
    read_clock,
    rebase,
    until,
    waits_on_sync,
)

W0 = 1_800_000_000.0  # 2027-01-15, a wall clock that is right
DAY = 86_400.0
BERLIN = ZoneInfo("Europe/Berlin")


def _wait(decision: Decision) -> float:
    assert isinstance(decision, Wait), decision
    return decision.seconds


def _late(decision: Decision) -> float:
    assert isinstance(decision, Late), decision
    return decision.by


# --- one boot ---------------------------------------------------------------------------------


def test_a_timer_waits_its_time_then_is_due_and_not_late_while_the_agent_runs() -> None:
    clock = FakeClock(wall=W0)
    mark = arm(read_clock(clock), 600)
    assert _wait(decide(mark, read_clock(clock))) == 600
    clock.advance(599.5)
    assert _wait(decide(mark, read_clock(clock))) == pytest.approx(0.5)
    clock.advance(0.5)
    assert decide(mark, read_clock(clock)) == Due()
    clock.advance(3600)  # a deadline that passed while the agent ran (a slow loop) is not late
    assert decide(mark, read_clock(clock)) == Due()


@pytest.mark.parametrize("jump", [DAY, -DAY])
def test_a_wall_jump_of_a_day_on_the_same_boot_changes_nothing(jump: float) -> None:
    clock = FakeClock(wall=W0)
    mark = arm(read_clock(clock), 600)
    clock.advance(100)
    clock.jump_wall(jump)
    assert _wait(decide(mark, read_clock(clock))) == pytest.approx(500)
    mark = checkpoint(mark, read_clock(clock))
    assert mark.remaining == pytest.approx(500)
    clock.advance(499)
    assert _wait(decide(mark, read_clock(clock))) == pytest.approx(1)
    clock.advance(1)
    assert decide(mark, read_clock(clock)) == Due()


def test_a_3_s_delay_interrupted_at_1_s_waits_2_s_after_a_restart_even_a_day_later_by_the_wall() -> (
    None
):
    """The acceptance case of issue 14 with an injected clock: the agent is killed 1 s into a
    3 s DELAY and comes back at once, the wall clock moved forward by a day in between."""
    clock = FakeClock(wall=W0)
    mark = checkpoint(arm(read_clock(clock), 3), read_clock(clock))
    clock.advance(1)
    stored = checkpoint(mark, read_clock(clock))
    clock.jump_wall(DAY)
    start = read_clock(clock)
    mark = rebase(stored, start)
    assert _wait(decide(mark, start)) == pytest.approx(2)
    clock.advance(1.9)
    assert isinstance(decide(mark, read_clock(clock)), Wait)
    clock.advance(0.1)
    assert decide(mark, read_clock(clock)) == Due()


def test_a_deadline_that_passed_while_the_agent_was_down_on_the_same_boot_is_late() -> None:
    clock = FakeClock(wall=W0)
    stored = arm(read_clock(clock), 60)
    clock.advance(100)  # the agent was down from arming until now
    mark = rebase(stored, read_clock(clock))
    assert _late(decide(mark, read_clock(clock))) == pytest.approx(40)


def test_rebase_on_the_same_boot_keeps_both_deadlines() -> None:
    clock = FakeClock(wall=W0)
    stored = arm(read_clock(clock), 60)
    clock.advance(10)
    mark = rebase(stored, read_clock(clock))
    assert (mark.boottime_deadline, mark.wall_deadline, mark.boot_id, mark.rebooted) == (
        stored.boottime_deadline,
        stored.wall_deadline,
        stored.boot_id,
        False,
    )
    assert mark.since == read_clock(clock).boottime


# --- the §11 table ----------------------------------------------------------------------------

# A 600 s timer, checkpointed 100 s in (500 s left), then the agent is down for `down` seconds.
# `long` (2000 s down: the deadline passed 1500 s ago) and `short` (100 s down: 400 s to go).
# What the first reading after the restart decides, in each row of the table:
TABLE = [
    # boot, synchronized at arming, synchronized now, long outage, short outage
    ("same", True, True, Late(1500), Wait(400)),
    ("same", True, False, Late(1500), Wait(400)),
    ("same", False, True, Late(1500), Wait(400)),
    ("same", False, False, Late(1500), Wait(400)),
    ("reboot", True, True, Late(1500), Wait(400)),  # the wall deadline rules
    ("reboot", True, False, Wait(500), Wait(500)),  # remaining time from start-up
    ("reboot", False, True, Wait(500), Wait(500)),  # the wall deadline is untrusted
    ("reboot", False, False, Wait(500), Wait(500)),
]


def _scenario(
    boot: str, synced_at_arming: bool, synced_now: bool, down: float
) -> tuple[FakeClock, TimerMark]:
    # An unsynchronized clock at arming is wrong by a day: the wall it shows is not the time.
    wall_at_arming = W0 if synced_at_arming else W0 - DAY
    clock = FakeClock(wall=wall_at_arming, boottime=1000.0, synchronized=synced_at_arming)
    mark = arm(read_clock(clock), 600)
    clock.advance(100)
    stored = checkpoint(mark, read_clock(clock))
    true_now = W0 + 100 + down
    if boot == "same":
        clock.advance(down)
        clock.set(synchronized=synced_now, wall=true_now if synced_now else W0 - 3 * DAY)
    else:
        # The board boots with its last saved time (or the right one once NTP has synced).
        # the agent starts 5 s into the boot, which is the last 5 s of the outage
        clock.reboot(wall=true_now - 5 if synced_now else W0 + 100, synchronized=synced_now)
        clock.advance(5)
    return clock, rebase(stored, read_clock(clock))


@pytest.mark.parametrize(("boot", "synced_at_arming", "synced_now", "long", "short"), TABLE)
def test_the_clock_table_of_design_section_11(
    boot: str, synced_at_arming: bool, synced_now: bool, long: Decision, short: Decision
) -> None:
    for down, expected in ((2000.0, long), (100.0, short)):
        clock, mark = _scenario(boot, synced_at_arming, synced_now, down)
        got = decide(mark, read_clock(clock))
        assert type(got) is type(expected), (down, got)
        if isinstance(expected, Wait):
            assert _wait(got) == pytest.approx(expected.seconds)
        elif isinstance(expected, Late):
            assert _late(got) == pytest.approx(expected.by)


@pytest.mark.parametrize(
    ("boot", "synced_at_arming", "waits"),
    [
        ("same", True, False),
        ("same", False, False),
        ("reboot", True, True),
        ("reboot", False, False),
    ],
)
def test_a_timer_waits_on_the_sync_only_when_the_sync_can_change_its_decision(
    boot: str, synced_at_arming: bool, waits: bool
) -> None:
    clock, mark = _scenario(boot, synced_at_arming, False, 100.0)
    assert waits_on_sync(mark, read_clock(clock)) is waits
    clock.set(synchronized=True)
    assert waits_on_sync(mark, read_clock(clock)) is False


def test_an_until_timer_waits_on_the_sync_whatever_the_boot() -> None:
    reading = _reading(_berlin(2026, 12, 1, 6, 0))
    mark = arm_until(reading, "06:30", BERLIN)
    assert isinstance(mark, TimerMark)
    assert waits_on_sync(mark, reading._replace(synchronized=False)) is True
    assert waits_on_sync(mark, reading) is False


@pytest.mark.parametrize(("down", "expected"), [(2000.0, "late"), (100.0, "wait")])
def test_after_a_reboot_the_wall_deadline_is_checked_again_once_the_clock_syncs(
    down: float, expected: str
) -> None:
    clock, mark = _scenario("reboot", True, False, down)
    assert _wait(decide(mark, read_clock(clock))) == pytest.approx(500)
    clock.advance(30)  # NTP syncs 30 s after the agent started: the wall jumps to the truth
    clock.set(wall=W0 + 100 + down + 30, synchronized=True)
    got = decide(mark, read_clock(clock))
    if expected == "late":
        # it was due 1500 s before the agent started, so 1530 s ago by now
        assert _late(got) == pytest.approx(1530)
    else:
        # 500 s were left at the crash; 100 s down and 30 s since have really passed
        assert _wait(got) == pytest.approx(370)


def test_a_deadline_that_passes_while_waiting_unsynchronized_is_due_not_late_once_synced() -> None:
    """Rebooted with 500 s left after 100 s down: really due 400 s after start. The clock syncs
    450 s after start; the deadline passed while the agent ran, so the timer is due, not late."""
    clock, mark = _scenario("reboot", True, False, 100.0)
    clock.advance(450)
    assert _wait(decide(mark, read_clock(clock))) == pytest.approx(50)
    clock.set(wall=W0 + 100 + 100 + 450, synchronized=True)
    assert decide(mark, read_clock(clock)) == Due()


def test_unsynchronized_after_a_reboot_it_fires_after_its_remaining_time() -> None:
    clock, mark = _scenario("reboot", True, False, 2000.0)
    clock.advance(499)
    assert _wait(decide(mark, read_clock(clock))) == pytest.approx(1)
    clock.advance(1)
    assert decide(mark, read_clock(clock)) == Due()


def test_a_reboot_into_1970_waits_the_remaining_time_and_a_later_sync_counts_from_the_truth() -> (
    None
):
    clock = FakeClock(wall=W0, boottime=50.0)
    stored = checkpoint(arm(read_clock(clock), 600), read_clock(clock))
    clock.advance(200)
    stored = checkpoint(stored, read_clock(clock))
    clock.reboot(wall=0.0)  # no RTC, no saved time: 1970
    mark = rebase(stored, read_clock(clock))
    assert read_clock(clock).wall == 0.0
    assert _wait(decide(mark, read_clock(clock))) == pytest.approx(400)
    clock.advance(100)
    mark = checkpoint(mark, read_clock(clock))  # checkpointed in 1970: by the boot-time clock
    assert mark.remaining == pytest.approx(300)
    clock.set(wall=W0 + 200 + 100, synchronized=True)  # synced; the reboot itself took no time
    assert _wait(decide(mark, read_clock(clock))) == pytest.approx(300)


def test_a_second_restart_in_the_new_boot_keeps_counting_from_the_boots_first_sighting() -> None:
    clock, mark = _scenario("reboot", False, False, 100.0)
    first = mark.boottime_deadline
    clock.advance(200)
    again = rebase(mark, read_clock(clock))  # the agent restarted, same (new) boot
    assert again.boottime_deadline == first
    assert again.rebooted
    assert _wait(decide(again, read_clock(clock))) == pytest.approx(300)


def test_decide_and_checkpoint_refuse_a_mark_of_another_boot() -> None:
    clock = FakeClock()
    mark = arm(read_clock(clock), 10)
    clock.reboot()
    with pytest.raises(ValueError, match=r"rebase\(\) it onto the current reading first"):
        decide(mark, read_clock(clock))
    with pytest.raises(ValueError, match="another boot"):
        checkpoint(mark, read_clock(clock))


def test_a_zero_or_negative_duration_is_due_at_once_and_never_late() -> None:
    clock = FakeClock()
    for seconds in (0.0, -5.0):
        mark = arm(read_clock(clock), seconds)
        assert mark.remaining == 0.0
        assert decide(mark, read_clock(clock)) == Due()


def test_a_mark_round_trips_through_its_dict() -> None:
    mark = arm(read_clock(FakeClock()), 5, needs_sync=True)
    assert TimerMark(**mark._asdict()) == mark


# --- until ------------------------------------------------------------------------------------


def _berlin(year: int, month: int, day: int, hour: int, minute: int, second: int = 0) -> float:
    return datetime(year, month, day, hour, minute, second, tzinfo=BERLIN).timestamp()


def _reading(wall: float, synchronized: bool = True) -> ClockReading:
    return ClockReading(wall=wall, boottime=10.0, boot_id="b", synchronized=synchronized)


def test_until_a_time_of_day_is_the_next_one_in_the_zone() -> None:
    morning = _reading(_berlin(2026, 12, 1, 5, 0))
    assert until(morning, "06:30", BERLIN) == _berlin(2026, 12, 1, 6, 30)
    evening = _reading(_berlin(2026, 12, 1, 7, 0))
    assert until(evening, "06:30", BERLIN) == _berlin(2026, 12, 2, 6, 30)
    on_the_dot = _reading(_berlin(2026, 12, 1, 6, 30))
    assert until(on_the_dot, "06:30", BERLIN) == _berlin(2026, 12, 2, 6, 30)
    assert until(morning, "06:30:15", BERLIN) == _berlin(2026, 12, 1, 6, 30, 15)


def test_until_across_the_spring_forward_night_is_an_hour_shorter_in_real_time() -> None:
    before = _reading(_berlin(2026, 3, 28, 7, 0))
    deadline = until(before, "06:30", BERLIN)
    assert isinstance(deadline, float)
    assert deadline - before.wall == 22.5 * 3600
    # 02:30 does not exist that night: read with the offset before the change, it is 03:30 CEST
    gap = until(_reading(_berlin(2026, 3, 29, 1, 0)), "02:30", BERLIN)
    assert gap == _berlin(2026, 3, 29, 3, 30)


def test_until_an_iso_date_and_time_with_or_without_offset() -> None:
    now = _reading(_berlin(2026, 12, 1, 5, 0))
    assert until(now, "2026-12-02T06:30:00+01:00", BERLIN) == _berlin(2026, 12, 2, 6, 30)
    assert until(now, "2026-12-02T06:30:00", BERLIN) == _berlin(2026, 12, 2, 6, 30)
    assert until(now, "2026-12-02T05:30:00Z", BERLIN) == _berlin(2026, 12, 2, 6, 30)


def test_until_refuses_an_unsynchronized_clock() -> None:
    assert until(_reading(0.0, synchronized=False), "06:30", BERLIN) == NeedsSync()
    assert arm_until(_reading(0.0, synchronized=False), "06:30", BERLIN) == NeedsSync()


@pytest.mark.parametrize("text", ["6:30", "24:00", "06:60", "tomorrow", "2026-12-02", "x" * 65])
def test_a_bad_until_is_one_sentence_saying_what_to_write(text: str) -> None:
    with pytest.raises(ValueError, match=r"write (HH:MM|one of those)") as info:
        parse_until(text)
    message = str(info.value)
    assert message.endswith(".")
    assert ". " not in message
    assert "\n" not in message


def test_an_until_timer_fires_at_its_wall_time_and_only_on_a_synchronized_clock() -> None:
    clock = FakeClock(wall=_berlin(2026, 12, 1, 6, 0), boottime=20.0)
    mark = arm_until(read_clock(clock), "06:30", BERLIN)
    assert isinstance(mark, TimerMark)
    assert mark.wall_deadline == _berlin(2026, 12, 1, 6, 30)
    assert _wait(decide(mark, read_clock(clock))) == pytest.approx(1800)
    clock.advance(600)
    stored = checkpoint(mark, read_clock(clock))
    clock.reboot(wall=_berlin(2026, 12, 1, 6, 10))  # the saved time; really 06:10 + the boot
    mark = rebase(stored, read_clock(clock))
    clock.advance(3600)
    assert decide(mark, read_clock(clock)) == NeedsSync()  # long past its remaining time
    clock.set(wall=_berlin(2026, 12, 1, 7, 10), synchronized=True)
    # 06:30 passed 40 min ago, 20 min after this boot's agent first saw it (06:10): due, not late
    assert decide(mark, read_clock(clock)) == Due()


def test_an_until_in_the_past_is_due_at_once() -> None:
    reading = _reading(_berlin(2026, 12, 3, 0, 0))
    mark = arm_until(reading, "2026-12-02T06:30:00+01:00", BERLIN)
    assert isinstance(mark, TimerMark)
    assert decide(mark, reading) == Due()


# --- the property: never early ----------------------------------------------------------------

_ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("advance"), st.floats(0, 5000)),
        st.tuples(st.just("jump"), st.floats(-3 * DAY, 3 * DAY)),
        st.tuples(st.just("sync"), st.just(0.0)),
        st.tuples(st.just("checkpoint"), st.just(0.0)),
        st.tuples(st.just("restart"), st.floats(0, 5000)),
        st.tuples(st.just("reboot"), st.floats(0, 5000)),
        st.tuples(st.just("reboot_1970"), st.floats(0, 5000)),
        st.tuples(st.just("reboot_synced"), st.floats(0, 5000)),
    ),
    max_size=25,
)


class _World:
    """A fake clock beside the true time; a synchronized wall clock shows the truth."""

    def __init__(self, synced: bool, wall_error: float, boottime: float) -> None:
        self.true = W0
        self.started = W0  # the true time at which the agent last started (or armed the timer)
        wall = W0 if synced else W0 + wall_error
        self.clock = FakeClock(wall=wall, boottime=boottime, synchronized=synced)

    def reading(self) -> ClockReading:
        return read_clock(self.clock)

    def act(self, action: str, value: float, stored: TimerMark) -> TimerMark:
        """Apply one action; return the mark as stored afterwards."""
        if action == "advance":
            self.true += value
            self.clock.advance(value)
        elif action == "jump":  # a clock that jumps was not right: it is not synchronized
            self.clock.jump_wall(value)
            self.clock.set(synchronized=False)
        elif action == "sync":
            self.clock.set(wall=self.true, synchronized=True)
        elif action == "checkpoint":
            return checkpoint(stored, self.reading())
        elif action == "restart":
            self.true += value
            self.clock.advance(value)
            self.started = self.true
            return rebase(stored, self.reading())
        else:
            self.true += value
            wall = {"reboot": None, "reboot_1970": 0.0, "reboot_synced": self.true}[action]
            self.clock.reboot(wall=wall, synchronized=action == "reboot_synced")
            self.started = self.true
            return rebase(stored, self.reading())
        return stored


@settings(max_examples=400, deadline=None)
@given(
    seconds=st.floats(0, 20_000),
    synced=st.booleans(),
    wall_error=st.floats(-10 * DAY, 10 * DAY),
    boottime=st.floats(0, 1e6),
    needs_sync=st.booleans(),
    actions=_ACTIONS,
)
def test_a_timer_never_fires_before_its_time_has_really_passed_and_is_late_only_after_an_outage(
    seconds: float,
    synced: bool,
    wall_error: float,
    boottime: float,
    needs_sync: bool,
    actions: list[tuple[str, float]],
) -> None:
    world = _World(synced, wall_error, boottime)
    stored = arm(world.reading(), seconds, needs_sync=needs_sync and synced)
    for action, value in actions:
        stored = world.act(action, value, stored)
        decision = decide(stored, world.reading())
        if isinstance(decision, Due | Late):
            elapsed = world.true - W0
            assert elapsed >= seconds - 1e-3, (action, decision, elapsed, seconds)
        if isinstance(decision, Late):  # late only for a deadline that passed while it was down
            assert W0 + seconds < world.started + 1e-3, (action, decision, world.started)
        if isinstance(decision, Wait):
            assert decision.seconds > 0
            assert math.isfinite(decision.seconds)
    # And it does fire: once its whole time has passed again, on a synchronized clock.
    world.act("advance", seconds + 1, stored)
    world.act("sync", 0.0, stored)
    assert isinstance(decide(stored, world.reading()), Due | Late)


# --- the real clock and its config ------------------------------------------------------------


def test_the_system_clock_reads_the_kernel_and_the_sync_file(tmp_path: Path) -> None:
    sync = tmp_path / "synchronized"
    clock = SystemClock(sync_file=str(sync))
    assert clock.synchronized() is False
    sync.touch()
    assert clock.synchronized() is True
    assert SystemClock(sync_file=str(tmp_path / "none"), assume_synchronized=True).synchronized()
    if os.path.exists("/proc/sys/kernel/random/boot_id"):
        with open("/proc/sys/kernel/random/boot_id") as f:
            assert clock.boot_id() == f.read().strip()
    first = clock.boottime()
    assert clock.boottime() >= first
    assert clock.boot_id() == clock.boot_id()


def test_without_a_kernel_boot_id_every_process_counts_as_its_own_boot(tmp_path: Path) -> None:
    missing = _read_boot_id(str(tmp_path / "boot_id"))
    assert missing.startswith("process-")
    assert _read_boot_id(str(tmp_path / "boot_id")) == missing
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert _read_boot_id(str(empty)) == missing
    real = tmp_path / "real"
    real.write_text("  7d4dd3e6-2c83-4a88-a655-1545a069d3d1\n")
    assert _read_boot_id(str(real)) == "7d4dd3e6-2c83-4a88-a655-1545a069d3d1"


def test_clock_config_defaults_refusals_and_the_clock_it_makes(tmp_path: Path) -> None:
    default = ClockConfig()
    assert (default.sync_file, default.assume_synchronized) == (DEFAULT_SYNC_FILE, False)
    with pytest.raises(ValidationError, match="extra"):
        ClockConfig.model_validate({"sync_fille": "/x"})
    with pytest.raises(ValidationError):
        ClockConfig(sync_file="")
    cfg = ClockConfig(sync_file=str(tmp_path / "never"), assume_synchronized=True)
    assert SystemClock.from_config(cfg).synchronized() is True
    for name, field in ClockConfig.model_fields.items():
        assert field.description, name
    with pytest.raises(ValueError, match="sync_file is empty"):
        SystemClock(sync_file="")


def test_the_fake_clock_moves_as_told() -> None:
    clock = FakeClock(wall=10.0, boottime=5.0, boot_id="a", synchronized=True)
    clock.advance(2)
    assert read_clock(clock) == ClockReading(12.0, 7.0, "a", True)
    clock.jump_wall(-100)
    assert read_clock(clock) == ClockReading(-88.0, 7.0, "a", True)
    clock.reboot()
    after = read_clock(clock)
    assert (after.wall, after.boottime, after.synchronized) == (-88.0, 0.0, False)
    assert after.boot_id not in ("a", "boot-1")
    clock.reboot(boot_id="z", wall=0.0, synchronized=True, boottime=3.0)
    assert read_clock(clock) == ClockReading(0.0, 3.0, "z", True)
    with pytest.raises(ValueError, match="never runs back"):
        clock.advance(-1)
