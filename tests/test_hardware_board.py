"""hardware.Board on gpiozero's MockFactory: config, device API, threads meeting the loop, simulation."""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from gpiozero import Device
from gpiozero.exc import BadPinFactory
from gpiozero.pins.mock import MockFactory

import hardware
from hardware import (
    Board,
    BoardClosed,
    BoardConfig,
    ConfigError,
    DeviceConfig,
    DeviceTimeout,
    HardwareError,
    InvalidValue,
    MockPinsRequired,
    NoPinFactory,
    UnknownDevice,
    WrongDeviceKind,
    WrongEventLoop,
    load_board_config,
)

# Rewrite the asserts of the shared contract too; this must run before its first import.
pytest.register_assert_rewrite("tests._hw_fixtures")

from tests._hw_fixtures import (  # noqa: E402 - imported after register_assert_rewrite on purpose
    DEVICES,
    IRRIGATION,
    ROOT,
    DeviceContract,
    Rig,
    states,
)

# -- the shared device contract, on mock pins -------------------------------------------------


@pytest.fixture
def rig(mock_factory: MockFactory) -> Iterator[Rig]:
    hw = Board.from_config(load_board_config(IRRIGATION / "devices.yaml"), pin_factory=mock_factory)
    yield Rig(board=hw, drive=lambda value: hw.set_input("level", value), records_history=True)
    hw.close()


class TestDeviceContractOnMockPins(DeviceContract):
    pass


# -- config validation ------------------------------------------------------------------------


def _problem(data: dict[str, object]) -> str:
    with pytest.raises(ConfigError) as caught:
        BoardConfig.parse(data)
    return str(caught.value)


def test_duplicate_pin_names_both_devices() -> None:
    message = _problem(
        {"devices": {"pump": {"kind": "output", "pin": 17}, "valve": {"kind": "output", "pin": 17}}}
    )
    assert "devices 'pump' and 'valve' both use BCM pin 17" in message


def test_unknown_kind_names_device_and_the_kinds() -> None:
    message = _problem({"devices": {"pump": {"kind": "relay", "pin": 17}}})
    assert "device 'pump'" in message
    assert "unknown kind 'relay'" in message
    assert "output, input, button, pwm" in message


@pytest.mark.parametrize(
    ("device", "key"),
    [
        ({"kind": "input", "pin": 22, "frequency": 50}, "'frequency' does not apply to an input"),
        ({"kind": "input", "pin": 22, "initial": True}, "'initial' does not apply to an input"),
        ({"kind": "button", "pin": 22, "safe": False}, "'safe' does not apply to a button"),
        ({"kind": "output", "pin": 22, "frequency": 50}, "'frequency' does not apply to an output"),
        ({"kind": "output", "pin": 22, "pull_up": True}, "'pull_up' does not apply to an output"),
        ({"kind": "pwm", "pin": 22, "bounce_time": 0.1}, "'bounce_time' does not apply to a pwm"),
    ],
)
def test_kind_field_mismatch(device: dict[str, object], key: str) -> None:
    message = _problem({"devices": {"level": device}})
    assert "device 'level'" in message
    assert key in message


@pytest.mark.parametrize("pin", [-1, 28, 40])
def test_pin_out_of_range(pin: int) -> None:
    message = _problem({"devices": {"pump": {"kind": "output", "pin": pin}}})
    assert f"device 'pump': BCM pin {pin} is out of range" in message
    assert "0 to 27" in message


@pytest.mark.parametrize("pin", ["GPIO17", True, 17.0])
def test_pin_must_be_an_integer(pin: object) -> None:
    message = _problem({"devices": {"pump": {"kind": "output", "pin": pin}}})
    assert "device 'pump': pin must be a BCM GPIO number" in message


@pytest.mark.parametrize(
    ("device", "fragment"),
    [
        ({"kind": "output", "pin": 5, "initial": 0.5}, "initial must be true or false"),
        (
            {"kind": "output", "pin": 5, "safe": 1},
            "safe must be true or false for an output device, not 1",
        ),
        ({"kind": "pwm", "pin": 5, "initial": 1.5}, "initial must be between 0.0 and 1.0"),
        ({"kind": "pwm", "pin": 5, "frequency": 0}, "frequency must be a positive number of hertz"),
        ({"kind": "input", "pin": 5, "bounce_time": -1}, "bounce_time must be a positive number"),
        ({"kind": "output", "pin": 5, "colour": "red"}, "unknown key 'colour'"),
        ({"pin": 5}, "missing required key 'kind'"),
        (
            {"kind": "input", "pin": 5, "pull_up": True, "active_high": True},
            "active_high: true contradicts pull_up: true",
        ),
        (
            {"kind": "button", "pin": 5, "active_high": True},
            "contradicts pull_up: true (the button default)",
        ),
    ],
)
def test_value_problems_are_sentences_naming_the_device(
    device: dict[str, object], fragment: str
) -> None:
    message = _problem({"devices": {"thing": device}})
    assert message.startswith("hardware config: device 'thing': ")
    assert fragment in message


def test_several_problems_are_all_listed() -> None:
    message = _problem(
        {"devices": {"a": {"kind": "relay", "pin": 1}, "b": {"kind": "output", "pin": 99}}}
    )
    assert "2 problems" in message
    assert "device 'a': unknown kind" in message
    assert "device 'b': BCM pin 99" in message


def test_simulate_must_name_an_input() -> None:
    base = {
        "devices": {"pump": {"kind": "output", "pin": 27}, "level": {"kind": "input", "pin": 22}}
    }
    unknown = _problem({**base, "simulate": [{"at": 1, "device": "lvl", "value": True}]})
    assert "simulate[0] drives unknown device 'lvl'" in unknown
    output = _problem({**base, "simulate": [{"at": 1, "device": "pump", "value": True}]})
    assert "simulate[0] drives 'pump', an output device" in output
    negative = _problem({**base, "simulate": [{"at": -1, "device": "level", "value": True}]})
    assert "simulate[0]: at:" in negative


def test_defaults_follow_gpiozero() -> None:
    config = BoardConfig.parse(
        {
            "devices": {
                "out": {"kind": "output", "pin": 1},
                "fan": {"kind": "pwm", "pin": 2},
                "inp": {"kind": "input", "pin": 3},
                "btn": {"kind": "button", "pin": 4},
                "float": {"kind": "input", "pin": 5, "pull_up": None, "active_high": False},
            }
        }
    )
    d = config.devices
    assert (d["out"].initial_value, d["out"].safe_value, d["out"].effective_active_high) == (
        False,
        False,
        True,
    )
    assert (d["fan"].initial_value, d["fan"].pwm_frequency) == (0.0, 100.0)
    assert (d["inp"].effective_pull_up, d["inp"].effective_active_high) == (False, True)
    assert (d["btn"].effective_pull_up, d["btn"].effective_active_high) == (True, False)
    assert (d["float"].effective_pull_up, d["float"].effective_active_high) == (None, False)


def test_irrigation_devices_yaml_loads() -> None:
    config = BoardConfig.from_yaml(IRRIGATION / "devices.yaml")
    assert config.pin_factory == "mock"
    assert {name: (d.kind, d.pin) for name, d in config.devices.items()} == {
        "valve": ("output", 17),
        "pump": ("output", 27),
        "level": ("input", 22),
    }
    assert config.devices["level"].pull_up is True
    assert config.devices["valve"].safe_value is False
    assert config.devices["pump"].safe_value is False
    assert load_board_config(IRRIGATION / "devices.yaml") == config


def test_from_yaml_unwraps_hardware_key_and_reports_file(tmp_path: Path) -> None:
    good = tmp_path / "agent-hw.yaml"
    good.write_text("hardware:\n  pin_factory: mock\n  devices:\n    led: {kind: output, pin: 4}\n")
    assert BoardConfig.from_yaml(good).devices["led"].pin == 4
    bad = tmp_path / "bad.yaml"
    bad.write_text("devices:\n  led: {kind: output, pin: 4, colour: red}\n")
    with pytest.raises(ConfigError, match=re.escape(f"{bad}: device 'led': unknown key 'colour'")):
        BoardConfig.from_yaml(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("devices: [\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_board_config(broken)
    with pytest.raises(ConfigError, match="Cannot read hardware config"):
        load_board_config(tmp_path / "missing.yaml")


def test_board_constructor_validates_devices(mock_factory: MockFactory) -> None:
    with pytest.raises(ConfigError, match="devices 'a' and 'b' both use BCM pin 4"):
        Board(
            devices={"a": {"kind": "output", "pin": 4}, "b": DeviceConfig(kind="input", pin=4)},
            pin_factory=mock_factory,
        )
    assert mock_factory.pins == {}, "nothing was opened"


# -- error tree and public surface ------------------------------------------------------------


def test_error_tree() -> None:
    leaves = {
        hardware.ConfigError: ValueError,
        hardware.UnknownDevice: KeyError,
        hardware.WrongDeviceKind: TypeError,
        hardware.InvalidValue: ValueError,
        hardware.DeviceTimeout: TimeoutError,
        hardware.DeviceUnavailable: RuntimeError,
        hardware.NoPinFactory: RuntimeError,
        hardware.MockPinsRequired: RuntimeError,
        hardware.BoardClosed: RuntimeError,
        hardware.WrongEventLoop: RuntimeError,
        hardware.NoBoard: RuntimeError,
    }
    errors = [
        obj
        for obj in vars(hardware).values()
        if isinstance(obj, type) and issubclass(obj, Exception)
    ]
    assert set(errors) == {HardwareError, *leaves}
    for leaf, builtin in leaves.items():
        assert issubclass(leaf, HardwareError)
        assert issubclass(leaf, builtin)
        assert (leaf.__doc__ or "").startswith("Raised when "), leaf


def test_all_is_sorted_and_complete() -> None:
    public = {
        name
        for name, obj in vars(hardware).items()
        if not name.startswith("_") and not inspect.ismodule(obj)
    }
    assert hardware.__all__ == sorted(hardware.__all__)
    assert set(hardware.__all__) == public


def test_threads_meet_the_loop_in_one_place_and_nothing_blocks() -> None:
    sources = {p.name: p.read_text() for p in (ROOT / "hardware").glob("*.py")}
    crossings = [
        name for name, text in sources.items() for _ in re.finditer(r"call_soon_threadsafe\(", text)
    ]
    assert crossings == ["_board.py"]
    for name, text in sources.items():
        for banned in (
            "time.sleep(",
            "wait_for_active",
            "wait_for_inactive",
            "wait_for_press",
            "import lgpio",
        ):
            assert banned not in text, f"{banned} in hardware/{name}"


# -- devices ----------------------------------------------------------------------------------


def test_unknown_device_names_the_known_ones(board: Board) -> None:
    with pytest.raises(UnknownDevice) as caught:
        board["pmup"]
    assert isinstance(caught.value, KeyError)
    assert caught.value.device == "pmup"
    assert "'pmup'" in str(caught.value)
    assert "'fan', 'level', 'pump', 'valve'" in str(caught.value)


def test_values_and_types(board: Board) -> None:
    assert board.snapshot() == {"valve": False, "pump": False, "level": False, "fan": 0.0}
    board["fan"].set(0.25)
    board["pump"].on()
    snap = board.snapshot()
    assert snap == {"valve": False, "pump": True, "level": False, "fan": 0.25}
    assert isinstance(snap["fan"], float)
    assert isinstance(snap["pump"], bool)


def test_pwm_history(board: Board) -> None:
    fan = board["fan"]
    fan.set(0.25)
    fan.on()
    fan.set(0.5)
    fan.off()
    assert states(board, "fan") == [0.0, 0.25, 1.0, 0.5, 0.0]
    assert board["fan"].gpio.frequency == 100


def test_set_rejects_wrong_kind_and_value(board: Board) -> None:
    with pytest.raises(
        WrongDeviceKind, match="Device 'level' is an input device, so it cannot be set"
    ):
        board["level"].set(True)
    with pytest.raises(InvalidValue, match=r"must be true or false, not 0\.5"):
        board["pump"].set(0.5)
    with pytest.raises(InvalidValue, match=r"from 0.0 to 1.0, not 1.5"):
        board["fan"].set(1.5)
    assert states(board, "pump") == [False]
    assert states(board, "fan") == [0.0]


def test_active_low_output_and_initial_value(mock_factory: MockFactory) -> None:
    with Board(
        devices={
            "relay": {"kind": "output", "pin": 5, "active_high": False},
            "lamp": {"kind": "output", "pin": 6, "initial": True},
            "dim": {"kind": "pwm", "pin": 12, "initial": 0.75, "frequency": 50},
        },
        pin_factory=mock_factory,
    ) as hw:
        hw["relay"].on()
        assert hw.snapshot() == {"relay": True, "lamp": True, "dim": 0.75}
        assert [s.state for s in mock_factory.pin(5).states] == [False, True, False]
        assert [s.state for s in mock_factory.pin(6).states] == [False, True]
        assert hw["dim"].gpio.frequency == 50


def test_safe_state_only_named_devices_skips_inputs_and_still_reports_unknown(board: Board) -> None:
    for name in ("valve", "pump"):
        board[name].on()
    board["fan"].set(0.9)
    assert board.safe_state(["pump", "level"]) == {"pump": False}
    assert board.snapshot()["valve"] is True
    with pytest.raises(UnknownDevice, match="'nope'"):
        board.safe_state(["nope", "fan", "valve"])
    assert states(board, "fan") == [0.0, 0.9, 0.2]
    assert states(board, "valve") == [False, True, False]
    assert states(board, "pump") == [False, True, False]


def test_close_goes_safe_releases_pins_and_is_idempotent(mock_factory: MockFactory) -> None:
    hw = Board(devices=DEVICES, pin_factory=mock_factory)
    hw["valve"].on()
    hw.close()
    hw.close()
    assert hw.closed
    assert [s.state for s in mock_factory.pin(17).states] == [False, True, False]
    assert all(d.gpio.closed for d in (hw._devices[n] for n in hw))
    with pytest.raises(BoardClosed):
        hw["valve"]
    assert hw.safe_state() == {}


def test_owned_mock_factory_is_closed_with_the_board() -> None:
    hw = Board(devices={"led": {"kind": "output", "pin": 4}}, pin_factory="mock")
    factory = hw.pin_factory
    assert hw.is_mock
    assert isinstance(factory, MockFactory)
    hw["led"].on()
    hw.close()
    assert factory.pins == {}


def test_given_factory_is_not_closed(mock_factory: MockFactory) -> None:
    with Board(devices={"led": {"kind": "output", "pin": 4}}, pin_factory=mock_factory) as hw:
        hw["led"].on()
    assert len(mock_factory.pins) == 1


def test_pin_in_use_is_reported(mock_factory: MockFactory) -> None:
    with (
        Board(devices={"led": {"kind": "output", "pin": 4}}, pin_factory=mock_factory),
        pytest.raises(hardware.DeviceUnavailable, match="device 'other' on BCM pin 4"),
    ):
        Board(devices={"other": {"kind": "output", "pin": 4}}, pin_factory=mock_factory)


# -- pin factory selection --------------------------------------------------------------------


def test_env_var_selects_mock_with_pwm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPIOZERO_PIN_FACTORY", "mock")
    with Board(devices={"fan": {"kind": "pwm", "pin": 18}}) as hw:
        assert hw.is_mock
        hw["fan"].set(0.5)
        assert hw["fan"].value == 0.5


def test_unknown_factory_name(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"Unknown pin factory 'gpiofoo'.*lgpio.*mock"):
        Board(devices={}, pin_factory="gpiofoo")
    monkeypatch.setenv("GPIOZERO_PIN_FACTORY", "nope")
    with pytest.raises(ConfigError, match="GPIOZERO_PIN_FACTORY environment variable"):
        Board(devices={})


@pytest.mark.skipif(importlib.util.find_spec("lgpio") is not None, reason="lgpio is installed here")
def test_named_factory_that_cannot_load_explains_mock() -> None:
    with pytest.raises(NoPinFactory) as caught:
        Board(devices={}, pin_factory="lgpio")
    assert "GPIOZERO_PIN_FACTORY=mock" in str(caught.value)
    assert "pin_factory: mock" in str(caught.value)


def test_no_factory_explains_mock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPIOZERO_PIN_FACTORY", raising=False)
    monkeypatch.setattr(Device, "pin_factory", None)

    def no_gpio() -> None:
        raise BadPinFactory("Unable to load any default pin factory!")

    monkeypatch.setattr(Device, "ensure_pin_factory", staticmethod(no_gpio))
    with pytest.raises(NoPinFactory) as caught:
        Board(devices={"led": {"kind": "output", "pin": 4}})
    message = str(caught.value)
    assert "Unable to load any default pin factory" in message
    assert "GPIOZERO_PIN_FACTORY=mock" in message
    assert "pin_factory: mock" in message
    assert isinstance(caught.value, RuntimeError)


@pytest.mark.skipif(
    Path("/proc/device-tree/model").exists() or Path("/dev/gpiochip0").exists(),
    reason="this machine has GPIO, so gpiozero's default factory may load",
)
def test_gpiozero_default_fails_cleanly_without_gpio(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GPIOZERO_PIN_FACTORY", raising=False)
    monkeypatch.setattr(Device, "pin_factory", None)
    with pytest.raises(NoPinFactory, match="GPIOZERO_PIN_FACTORY=mock"):
        Board(devices={"led": {"kind": "output", "pin": 4}})


# -- inputs, the loop and threads -------------------------------------------------------------


def test_set_input_honours_pull_and_active_level(mock_factory: MockFactory) -> None:
    with Board(
        devices={
            "float": {"kind": "input", "pin": 22, "pull_up": True},
            "beam": {"kind": "input", "pin": 23},
            "ext": {"kind": "input", "pin": 24, "pull_up": None, "active_high": False},
            "btn": {"kind": "button", "pin": 25},
        },
        pin_factory=mock_factory,
    ) as hw:
        for name in ("float", "beam", "ext", "btn"):
            hw.set_input(name, True)
        assert hw.snapshot() == {"float": True, "beam": True, "ext": True, "btn": True}
        # pulled up reads high at rest; active means driven low
        assert [s.state for s in mock_factory.pin(22).states] == [False, True, False]
        assert [s.state for s in mock_factory.pin(23).states] == [False, True]
        assert [s.state for s in mock_factory.pin(24).states] == [False]
        hw.set_input("ext", False)
        assert [s.state for s in mock_factory.pin(24).states] == [False, True]
        assert hw["ext"].value is False


def test_set_input_refuses_outputs_and_real_pins(
    board: Board, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(WrongDeviceKind, match="'valve'"):
        board.set_input("valve", True)
    monkeypatch.setattr(Board, "is_mock", property(lambda self: False))
    with pytest.raises(MockPinsRequired, match="GPIOZERO_PIN_FACTORY=mock"):
        board.set_input("level", True)
    with pytest.raises(MockPinsRequired, match="pin_factory: mock"):
        board.simulate([{"at": 0, "device": "level", "value": True}])
    assert board["level"].value is False


async def test_loop_is_captured_lazily(board: Board) -> None:
    assert board.loop is None
    await board["level"].wait_for(False, timeout=1)
    assert board.loop is asyncio.get_running_loop()


async def test_callbacks_cross_with_call_soon_threadsafe(
    board: Board, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = asyncio.get_running_loop()
    crossings: list[str] = []
    original = loop.call_soon_threadsafe

    def spy(callback, *args, **kwargs):  # type: ignore[no-untyped-def]
        crossings.append(threading.current_thread().name)
        return original(callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_soon_threadsafe", spy)
    thread = threading.Thread(target=board.set_input, args=("level", True), name="gpio-thread")
    waiting = asyncio.create_task(board["level"].wait_for(True, timeout=2))
    await asyncio.sleep(0)
    thread.start()
    assert await waiting is True
    thread.join()
    assert crossings == ["gpio-thread"]


async def test_wait_for_rejects_outputs_and_other_loops(mock_factory: MockFactory) -> None:
    other = asyncio.new_event_loop()
    try:
        with Board(devices=DEVICES, pin_factory=mock_factory, loop=other) as hw:
            with pytest.raises(
                WrongDeviceKind, match="'pump' is an output device, so it cannot be waited on"
            ):
                await hw["pump"].wait_for(True, timeout=1)
            with pytest.raises(WrongEventLoop, match="another event loop"):
                await hw["level"].wait_for(True, timeout=1)
    finally:
        other.close()


async def test_closed_loop_is_replaced(mock_factory: MockFactory) -> None:
    old = asyncio.new_event_loop()
    old.close()
    with Board(devices=DEVICES, pin_factory=mock_factory, loop=old) as hw:
        assert await hw["level"].wait_for(False, timeout=1) is False
        assert hw.loop is asyncio.get_running_loop()


async def test_wait_for_wakes_when_driven_on_the_loop_thread(board: Board) -> None:
    async def press() -> None:
        await asyncio.sleep(0.02)
        board.set_input("level", True)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(press(), name="press")
        assert await board["level"].wait_for(True, timeout=2) is True


async def test_close_wakes_waiters_and_ends_edge_streams(mock_factory: MockFactory) -> None:
    hw = Board(devices=DEVICES, pin_factory=mock_factory)
    stream = hw["level"].edges()
    waiting = asyncio.create_task(hw["level"].wait_for(True, timeout=5))
    await asyncio.sleep(0.01)
    hw.close()
    with pytest.raises(BoardClosed, match="'level'"):
        await waiting
    assert [edge async for edge in stream] == []


async def test_edges_subscribe_on_creation_and_unsubscribe_on_exit(board: Board) -> None:
    level = board["level"]
    stream = level.edges()
    board.set_input("level", True)  # before the first __anext__: still delivered
    async with asyncio.timeout(2):
        edge = await anext(stream)
    assert (edge.device, edge.value) == ("level", True)
    stream.close()
    board.set_input("level", False)
    await asyncio.sleep(0.01)
    assert level._streams == set()
    with pytest.raises(StopAsyncIteration):
        await anext(stream)


async def test_timeout_zero_and_negative(board: Board) -> None:
    with pytest.raises(DeviceTimeout):
        await board["level"].wait_for(True, timeout=0)
    with pytest.raises(InvalidValue, match="timeout must be zero or more"):
        await board["level"].wait_for(True, timeout=-1)


async def test_wait_for_can_be_cancelled(board: Board) -> None:
    task = asyncio.create_task(board["level"].wait_for(True))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert board["level"]._waiters == []


# -- simulation -------------------------------------------------------------------------------


async def test_simulate_applies_the_config_script_on_time(mock_factory: MockFactory) -> None:
    config = BoardConfig.parse(
        {
            "devices": {"level": {"kind": "input", "pin": 22, "pull_up": True}},
            "simulate": [
                {"at": 0.15, "device": "level", "value": False},
                {"at": 0.05, "device": "level", "value": True},
            ],
        }
    )
    with Board.from_config(config, pin_factory=mock_factory) as hw:
        started = time.monotonic()
        async with hw["level"].edges() as edges, asyncio.TaskGroup() as tg:
            tg.create_task(hw.simulate(), name="simulate")
            seen = [await anext(edges), await anext(edges)]
        assert [e.value for e in seen] == [True, False]
        assert 0.04 <= seen[0].at - started < 0.15
        assert seen[1].at - started >= 0.14
        assert [s.state for s in mock_factory.pin(22).states] == [False, True, False, True]


def test_simulate_checks_changes_before_running(board: Board) -> None:
    with pytest.raises(UnknownDevice, match="'lvl'"):
        board.simulate([{"at": 0, "device": "lvl", "value": True}])
    with pytest.raises(WrongDeviceKind, match=r"'pump'.*cannot be simulated"):
        board.simulate([{"at": 0, "device": "pump", "value": True}])


async def test_irrigation_config_simulation_closes_the_float_switch(
    mock_factory: MockFactory,
) -> None:
    config = load_board_config(IRRIGATION / "devices.yaml")
    with Board.from_config(config, pin_factory=mock_factory) as hw:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(hw.simulate(), name="simulate")
            assert await hw["level"].wait_for(True, timeout=5) is True
