"""Shared helpers and the device contract run on mock pins and, on a Pi, on real pins.

``DeviceContract`` holds tests that need only a ``rig`` fixture (a board wired like the irrigation
example plus a way to drive its ``level`` input). ``test_hardware_board.py`` runs it on gpiozero's
``MockFactory``; ``test_real_pins.py`` runs the same class on a real pin factory.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from gpiozero.pins.mock import MockFactory, MockPWMPin

from agent._context import StepContext
from hardware import Board, DeviceTimeout, steps

ROOT = Path(__file__).resolve().parent.parent
IRRIGATION = ROOT / "workflows" / "irrigation"

#: The irrigation wiring plus a pwm fan, for board tests on mock pins.
DEVICES: dict[str, dict[str, Any]] = {
    "valve": {"kind": "output", "pin": 17},
    "pump": {"kind": "output", "pin": 27},
    "level": {"kind": "input", "pin": 22, "pull_up": True},
    "fan": {"kind": "pwm", "pin": 18, "safe": 0.2},
}


@contextmanager
def mock_pins() -> Iterator[MockFactory]:
    """gpiozero's MockFactory with PWM-capable pins, closed and reset afterwards (gpiozero's habit)."""
    factory = MockFactory(pin_class=MockPWMPin)
    try:
        yield factory
    finally:
        factory.close()
        factory.reset()


@pytest.fixture
def mock_factory() -> Iterator[MockFactory]:
    with mock_pins() as factory:
        yield factory


@pytest.fixture
def board(mock_factory: MockFactory) -> Iterator[Board]:
    """A board with the irrigation wiring plus a pwm fan (``DEVICES``), on mock pins."""
    with Board(devices=DEVICES, pin_factory=mock_factory) as hw:
        yield hw


def states(board: Board, name: str) -> list[Any]:
    """Every state the mock pin went through, oldest first (the exact list, unlike assert_states)."""
    return [s.state for s in board[name].gpio.pin.states]


def make_context(
    board: Board | None,
    step_name: str = "Open_Valve",
    *,
    compensating: bool = False,
    params: dict[str, Any] | None = None,
) -> StepContext:
    suffix = ":compensate" if compensating else ""
    return StepContext(
        workflow_id="wf-1",
        workflow_type="Irrigation",
        step_name=step_name,
        attempt=1,
        idempotency_key=f"wf-1:{step_name}{suffix}",
        params=params or {},
        hardware=board,
        compensating=compensating,
    )


def drive_later(delay: float, drive: Callable[[], None]) -> tuple[threading.Timer, list[float]]:
    """Run ``drive`` on another thread after ``delay``; the list receives its monotonic time."""
    when: list[float] = []

    def fire() -> None:
        when.append(time.monotonic())
        drive()

    timer = threading.Timer(delay, fire)
    timer.start()
    return timer, when


class Ticker:
    """Counts how often a coroutine got the loop while something else was awaited."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.ticks = 0

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.ticks += 1


@dataclass
class Rig:
    """A board with the irrigation wiring and a way to make ``level`` read a value."""

    board: Board
    drive: Callable[[bool], None]
    #: True when pin histories can be read (mock pins record them; real pins do not).
    records_history: bool


class DeviceContract:
    """Behaviour every pin factory must give; subclasses provide the ``rig`` fixture."""

    def test_outputs_start_off_and_input_reads_inactive(self, rig: Rig) -> None:
        snap = rig.board.snapshot()
        assert snap["valve"] is False
        assert snap["pump"] is False
        assert snap["level"] is False, (
            "the float switch must be open (tank not full) for these tests"
        )

    def test_set_and_read_back(self, rig: Rig) -> None:
        valve = rig.board["valve"]
        seen = []
        valve.on()
        seen.append(valve.value)
        valve.set(False)
        seen.append(valve.value)
        valve.set(True)
        seen.append(valve.value)
        valve.off()
        seen.append(valve.value)
        assert seen == [True, False, True, False]
        if rig.records_history:
            assert states(rig.board, "valve") == [False, True, False, True, False]

    async def test_wait_for_returns_at_once_when_already_there(self, rig: Rig) -> None:
        started = time.monotonic()
        assert await rig.board["level"].wait_for(False, timeout=5) is False
        assert time.monotonic() - started < 0.05

    async def test_wait_for_is_woken_by_another_thread(self, rig: Rig) -> None:
        ticker = Ticker()
        tick_task = asyncio.create_task(ticker.run(), name="ticker")
        timer, driven_at = drive_later(0.15, lambda: rig.drive(True))
        try:
            started = time.monotonic()
            result = await rig.board["level"].wait_for(True, timeout=5)
            woke = time.monotonic()
        finally:
            tick_task.cancel()
            timer.join()
        assert result is True
        assert len(driven_at) == 1
        assert woke - driven_at[0] < 0.05, f"woke {woke - driven_at[0]:.3f} s after the edge"
        assert woke - started < 1.0, "returned well before the 5 s timeout"
        # The loop stayed free while waiting: the ticker ran many times in ~150 ms.
        assert ticker.ticks >= 5

    async def test_wait_for_timeout_names_device_and_costs_no_cpu(self, rig: Rig) -> None:
        cpu = time.process_time()
        started = time.monotonic()
        with pytest.raises(DeviceTimeout) as caught:
            await rig.board["level"].wait_for(True, timeout=0.3)
        elapsed = time.monotonic() - started
        cpu = time.process_time() - cpu
        assert caught.value.device == "level"
        assert caught.value.value is True
        assert isinstance(caught.value, TimeoutError)
        assert "'level'" in str(caught.value)
        assert "True" in str(caught.value)
        assert 0.29 <= elapsed < 1.0
        assert cpu < 0.15, f"waiting burned {cpu:.3f} s of CPU: something polls"

    async def test_edges_yield_each_change_in_order(self, rig: Rig) -> None:
        def toggle() -> None:
            rig.drive(True)
            time.sleep(0.05)  # on the timer thread, never on the loop
            rig.drive(False)

        async with rig.board["level"].edges() as edges:
            timer, _ = drive_later(0.05, toggle)
            try:
                seen = []
                async with asyncio.timeout(3):
                    async for edge in edges:
                        seen.append(edge)
                        if len(seen) == 2:
                            break
            finally:
                timer.join()
        assert [(e.device, e.value) for e in seen] == [("level", True), ("level", False)]
        assert seen[0].at <= seen[1].at

    def test_safe_state_turns_outputs_off(self, rig: Rig) -> None:
        rig.board["valve"].on()
        rig.board["pump"].on()
        applied = rig.board.safe_state()
        assert applied["valve"] is False
        assert applied["pump"] is False
        assert "level" not in applied
        assert rig.board["valve"].value is False
        assert rig.board["pump"].value is False

    async def test_set_output_step_and_restore(self, rig: Rig) -> None:
        from workflows.irrigation.models import IrrigationState

        state = IrrigationState()
        forward = make_context(rig.board, "Start_Pump")
        result = await steps.set_output(state, forward, device="pump", value=True)
        assert rig.board["pump"].value is True
        state = IrrigationState.model_validate({**state.model_dump(), **result})
        back = make_context(rig.board, "Start_Pump", compensating=True)
        await steps.restore_output(state, back, device="pump", value=True)
        assert rig.board["pump"].value is False
        if rig.records_history:
            assert states(rig.board, "pump") == [False, True, False]
