"""The bundled GPIO steps and their compensations, on exact mock pin histories."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import time
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from agent._context import StepContext
from hardware import (
    Board,
    ConfigError,
    DeviceTimeout,
    HardwareState,
    NoBoard,
    UnknownDevice,
    WrongDeviceKind,
    steps,
)
from workflows.irrigation.models import IrrigationState

# Rewrite the asserts of the shared contract too; this must run before its first import.
pytest.register_assert_rewrite("tests._hw_fixtures")

from tests._hw_fixtures import (  # noqa: E402 - imported after register_assert_rewrite on purpose
    IRRIGATION,
    Ticker,
    drive_later,
    make_context,
    states,
)


class PlainState(HardwareState):
    level: bool | None = None
    waited: float | None = None


def merge(state: HardwareState, result: dict[str, Any] | None) -> HardwareState:
    """What the engine does with a step result: merge and validate against the state model."""
    return type(state).model_validate({**state.model_dump(), **(result or {})})


# -- set_output / restore_output --------------------------------------------------------------


async def test_set_output_then_restore_output(board: Board) -> None:
    state = PlainState()
    result = await steps.set_output(
        state, make_context(board, "Open_Valve"), device="valve", value=True
    )
    assert result == {"gpio": {"Open_Valve": {"device": "valve", "previous": False, "value": True}}}
    state = merge(state, result)
    back = make_context(board, "Open_Valve", compensating=True)
    assert await steps.restore_output(state, back, device="valve", value=True) is None
    assert states(board, "valve") == [False, True, False]


async def test_restore_output_puts_back_what_was_there(board: Board) -> None:
    board["pump"].on()
    state = PlainState()
    state = merge(
        state,
        await steps.set_output(state, make_context(board, "Stop_Pump"), device="pump", value=False),
    )
    assert state.gpio["Stop_Pump"]["previous"] is True
    await steps.restore_output(
        state, make_context(board, "Stop_Pump", compensating=True), device="pump"
    )
    assert states(board, "pump") == [False, True, False, True]


async def test_restore_output_without_record_uses_safe_value(board: Board) -> None:
    board["pump"].on()  # the forward step ran but was interrupted before its result was saved
    await steps.restore_output(
        PlainState(),
        make_context(board, "Start_Pump", compensating=True),
        device="pump",
        value=True,
    )
    assert states(board, "pump") == [False, True, False]


async def test_restore_output_ignores_record_for_another_device(board: Board) -> None:
    board["fan"].set(0.7)
    state = PlainState(gpio={"Step": {"device": "valve", "previous": True, "value": False}})
    await steps.restore_pwm(state, make_context(board, "Step", compensating=True), device="fan")
    assert states(board, "fan") == [0.0, 0.7, 0.2]


async def test_set_output_keeps_other_steps_records(board: Board) -> None:
    state = PlainState(gpio={"Earlier": {"device": "fan", "previous": 0.0, "value": 0.5}})
    result = await steps.set_output(state, make_context(board, "Later"), device="pump", value=True)
    assert set(result["gpio"]) == {"Earlier", "Later"}


# -- pulse / safe_output ----------------------------------------------------------------------


async def test_pulse_and_safe_output(board: Board) -> None:
    state = PlainState()
    started = time.monotonic()
    result = await steps.pulse(state, make_context(board, "Beep"), device="valve", seconds=0.05)
    assert time.monotonic() - started >= 0.05
    assert states(board, "valve") == [False, True, False]
    assert result["gpio"]["Beep"] == {"device": "valve", "previous": False, "value": True}
    board["valve"].on()  # as if the pulse were cut short with the valve open
    await steps.safe_output(
        merge(state, result),
        make_context(board, "Beep", compensating=True),
        device="valve",
        seconds=0.05,
    )
    assert states(board, "valve") == [False, True, False, True, False]


async def test_pulse_pwm_to_a_value_and_back(board: Board) -> None:
    board["fan"].set(0.3)
    await steps.pulse(
        PlainState(), make_context(board, "Boost"), device="fan", seconds=0.01, value=1.0
    )
    assert states(board, "fan") == [0.0, 0.3, 1.0, 0.3]


async def test_cancelled_pulse_restores_the_previous_value(board: Board) -> None:
    task = asyncio.create_task(
        steps.pulse(PlainState(), make_context(board, "Beep"), device="pump", seconds=10)
    )
    await asyncio.sleep(0.02)
    assert board["pump"].value is True
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert states(board, "pump") == [False, True, False]


# -- run_for / stop_output --------------------------------------------------------------------


async def test_run_for_keeps_the_loop_free_and_stop_output(board: Board) -> None:
    ticker = Ticker()
    async with asyncio.TaskGroup() as tg:
        tick = tg.create_task(ticker.run(), name="ticker")
        result = await steps.run_for(
            PlainState(), make_context(board, "Run_Pump"), device="pump", seconds=0.1
        )
        tick.cancel()
    assert ticker.ticks >= 5
    assert states(board, "pump") == [False, True, False]
    assert result["gpio"]["Run_Pump"] == {"device": "pump", "previous": False, "value": False}
    board["pump"].on()
    await steps.stop_output(
        PlainState(), make_context(board, "Run_Pump", compensating=True), device="pump", seconds=0.1
    )
    assert states(board, "pump") == [False, True, False, True, False]


# -- set_pwm / restore_pwm --------------------------------------------------------------------


async def test_set_pwm_then_restore_pwm(board: Board) -> None:
    board["fan"].set(0.4)
    state = PlainState()
    result = await steps.set_pwm(state, make_context(board, "Fan"), device="fan", value=0.9)
    assert result["gpio"]["Fan"] == {"device": "fan", "previous": 0.4, "value": 0.9}
    await steps.restore_pwm(
        merge(state, result), make_context(board, "Fan", compensating=True), device="fan", value=0.9
    )
    assert states(board, "fan") == [0.0, 0.4, 0.9, 0.4]


async def test_set_pwm_refuses_a_digital_output(board: Board) -> None:
    with pytest.raises(
        WrongDeviceKind, match="'pump' is an output device, so it cannot take a duty cycle"
    ):
        await steps.set_pwm(PlainState(), make_context(board, "Fan"), device="pump", value=0.5)
    assert states(board, "pump") == [False]


# -- wait_for_input / read_input --------------------------------------------------------------


async def test_wait_for_input_woken_from_another_thread_writes_fields(board: Board) -> None:
    state = PlainState()
    timer, _ = drive_later(0.05, lambda: board.set_input("level", True))
    try:
        result = await steps.wait_for_input(
            state,
            make_context(board, "Wait_For_Level"),
            device="level",
            value=True,
            timeout=3,
            field="level",
            elapsed_field="waited",
        )
    finally:
        timer.join()
    assert result is not None
    assert result["level"] is True
    assert 0.04 <= result["waited"] < 1.0
    assert merge(state, result).level is True


async def test_wait_for_input_timeout_raises_device_timeout(board: Board) -> None:
    with pytest.raises(DeviceTimeout, match=r"'level' did not become True within 0\.1 s"):
        await steps.wait_for_input(
            PlainState(), make_context(board, "Wait"), device="level", value=True, timeout=0.1
        )


async def test_wait_for_input_checks_field_before_waiting(board: Board) -> None:
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"state field 'levle'.*PlainState has no such field"):
        await steps.wait_for_input(
            PlainState(), make_context(board, "Wait"), device="level", timeout=5, field="levle"
        )
    assert time.monotonic() - started < 0.5


async def test_wait_for_input_without_field_returns_none(board: Board) -> None:
    assert (
        await steps.wait_for_input(
            PlainState(), make_context(board, "Wait"), device="level", value=False, timeout=1
        )
        is None
    )


async def test_read_input(board: Board) -> None:
    board.set_input("level", True)
    result = await steps.read_input(
        PlainState(), make_context(board, "Read"), device="level", field="level"
    )
    assert result == {"level": True}
    with pytest.raises(ConfigError, match="'nope'"):
        await steps.read_input(
            PlainState(), make_context(board, "Read"), device="level", field="nope"
        )


# -- errors -----------------------------------------------------------------------------------


async def test_steps_without_a_board_fail_clearly() -> None:
    with pytest.raises(NoBoard, match=r"'Open_Valve' of Irrigation drives GPIO.*pin_factory: mock"):
        await steps.set_output(PlainState(), make_context(None), device="valve", value=True)


async def test_a_plain_state_needs_no_gpio_field(board: Board) -> None:
    """The record goes on the context (the engine journals it), not into the state."""
    from pydantic import BaseModel

    class Bare(BaseModel):
        zone: str = "A"

    forward = make_context(board)
    assert await steps.set_output(Bare(), forward, device="valve", value=True) is None
    assert forward.outputs == {"valve": {"previous": False, "value": True}}
    fan = make_context(board, "Fan")
    assert await steps.set_pwm(Bare(), fan, device="fan", value=0.5) is None
    assert fan.outputs == {"fan": {"previous": 0.0, "value": 0.5}}
    # The compensation gets what the forward step committed, as the engine hands it back.
    back = StepContext(**{**forward_fields(forward), "compensating": True})
    await steps.restore_output(Bare(), back, device="valve")
    assert states(board, "valve") == [False, True, False]


async def test_the_journal_record_wins_over_the_state_one(board: Board) -> None:
    board["valve"].set(True)
    stale = PlainState(gpio={"Open_Valve": {"device": "valve", "previous": True, "value": True}})
    back = StepContext(
        **{
            **forward_fields(make_context(board)),
            "compensating": True,
            "outputs": {"valve": {"previous": False, "value": True}},
        }
    )
    await steps.restore_output(stale, back, device="valve")
    assert states(board, "valve") == [False, True, False]


def forward_fields(ctx: StepContext) -> dict[str, Any]:
    return {name: getattr(ctx, name) for name in StepContext.__match_args__}


async def test_bad_params(board: Board) -> None:
    with pytest.raises(UnknownDevice, match="'valev'"):
        await steps.set_output(PlainState(), make_context(board), device="valev", value=True)
    with pytest.raises(ConfigError, match="seconds must be a number of seconds"):
        await steps.run_for(PlainState(), make_context(board), device="pump", seconds="ten")
    with pytest.raises(WrongDeviceKind):
        await steps.set_output(PlainState(), make_context(board), device="level", value=True)
    assert states(board, "pump") == [False]


def test_unknown_result_field_fails_validation() -> None:
    with pytest.raises(ValidationError, match="levle"):
        merge(PlainState(), {"levle": True})


async def test_failing_custom_step_is_compensated(board: Board) -> None:
    async def start_pump_then_fail(state: Any, context: Any) -> None:
        context.hardware["pump"].on()
        raise RuntimeError("flow sensor reports no flow")

    state = PlainState()
    with pytest.raises(RuntimeError, match="no flow"):
        await start_pump_then_fail(state, make_context(board, "Start_Pump"))
    assert board["pump"].value is True
    # interrupted-or-failed forward step: no record, so the compensation falls back to safe
    await steps.restore_output(
        state, make_context(board, "Start_Pump", compensating=True), device="pump"
    )
    assert states(board, "pump") == [False, True, False]


# -- every step binds like the definition loader checks ---------------------------------------

PAIRS = {
    "set_output": ("restore_output", {"device": "valve", "value": True}),
    "pulse": ("safe_output", {"device": "valve", "seconds": 1}),
    "run_for": ("stop_output", {"device": "pump", "seconds": 1}),
    "set_pwm": ("restore_pwm", {"device": "fan", "value": 0.5}),
}


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_compensation_takes_the_forward_params(name: str) -> None:
    compensation, params = PAIRS[name]
    for fn in (getattr(steps, name), getattr(steps, compensation)):
        assert inspect.iscoroutinefunction(fn)
        inspect.signature(fn).bind(PlainState(), make_context(None), **params)


def test_steps_all_is_sorted_and_complete() -> None:
    public = {
        n
        for n, f in vars(steps).items()
        if inspect.iscoroutinefunction(f) and not n.startswith("_")
    }
    assert steps.__all__ == sorted(public)


# -- the irrigation workflow's definition binds (the engine runs it in test_hardware_agent.py) --


def _resolve(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def load_irrigation() -> dict[str, Any]:
    return yaml.safe_load((IRRIGATION / "irrigation.yaml").read_text())


def test_irrigation_definition_binds() -> None:
    definition = load_irrigation()
    assert definition["workflow_type"] == "Irrigation"
    assert definition["saga_mode"] is True
    assert definition["resources"] == ["valve", "pump", "level"]
    assert [s["name"] for s in definition["steps"]] == [
        "Open_Valve",
        "Start_Pump",
        "Wait_For_Level",
        "Stop_Pump",
        "Close_Valve",
    ]
    model = _resolve(definition["initial_state_model"])
    assert model is IrrigationState
    for step in definition["steps"]:
        for key in ("function", "compensate_function"):
            if key in step:
                inspect.signature(_resolve(step[key])).bind(
                    model(), make_context(None), **step["params"]
                )
