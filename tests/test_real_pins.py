"""The device contract on real GPIO (a Raspberry Pi wired like workflows/irrigation/devices.yaml).

Run on the Pi with ``EDGESAGA_REAL_PINS=1`` (and ``GPIOZERO_PIN_FACTORY=lgpio`` on a Pi 5, or leave it
unset for gpiozero's default). Wiring: relays on BCM17 (valve) and BCM27 (pump), float switch from
BCM22 to GND. Keep the float switch OPEN (tank not full): the tests make ``level`` change by
switching the pin's internal pull between up and down, which gives real edges through the driver's
own callback thread without touching the switch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

if os.environ.get("EDGESAGA_REAL_PINS") != "1":
    pytest.skip(
        "set EDGESAGA_REAL_PINS=1 on a Raspberry Pi with the irrigation wiring to run real-pin tests",
        allow_module_level=True,
    )

pytest.register_assert_rewrite("tests._hw_fixtures")

from hardware import Board, load_board_config  # noqa: E402 - only imported when the tests run
from tests._hw_fixtures import IRRIGATION, DeviceContract, Rig  # noqa: E402 - after the rewrite hook


@pytest.fixture
def rig() -> Iterator[Rig]:
    config = load_board_config(IRRIGATION / "devices.yaml")
    devices = dict(config.devices)
    # Pull-driven edges do not bounce; debouncing would only delay them past the 50 ms budget.
    devices["level"] = devices["level"].model_copy(update={"bounce_time": None})
    # pin_factory=None: GPIOZERO_PIN_FACTORY or gpiozero's default, never the yaml's "mock".
    hw = Board(devices=devices, pin_factory=None)
    assert not hw.is_mock, "unset GPIOZERO_PIN_FACTORY=mock to test real pins"
    pin = hw["level"].gpio.pin
    active_high = devices["level"].effective_active_high

    def drive(value: bool) -> None:
        pin.pull = "up" if value == active_high else "down"

    yield Rig(board=hw, drive=drive, records_history=False)
    pin.pull = "up"
    hw.close()


class TestDeviceContractOnRealPins(DeviceContract):
    pass
