"""edgesaga's hardware abstraction layer: named gpiozero devices with an asyncio API.

Build a :class:`Board` from a devices config, drive it from coroutines, and use the bundled GPIO
steps in :mod:`hardware.steps` from workflow YAML. Mock pins (``pin_factory: mock`` or
``GPIOZERO_PIN_FACTORY=mock``) make all of it run on a desktop and in CI.
"""

from hardware._board import Board, BoardDevice, Edge, EdgeStream
from hardware._config import BoardConfig, DeviceConfig, SimulatedChange, load_board_config
from hardware._errors import (
    BoardClosed,
    ConfigError,
    DeviceTimeout,
    DeviceUnavailable,
    HardwareError,
    InvalidValue,
    MockPinsRequired,
    NoBoard,
    NoPinFactory,
    UnknownDevice,
    WrongDeviceKind,
    WrongEventLoop,
)
from hardware._state import HardwareState

__all__ = [
    "Board",
    "BoardClosed",
    "BoardConfig",
    "BoardDevice",
    "ConfigError",
    "DeviceConfig",
    "DeviceTimeout",
    "DeviceUnavailable",
    "Edge",
    "EdgeStream",
    "HardwareError",
    "HardwareState",
    "InvalidValue",
    "MockPinsRequired",
    "NoBoard",
    "NoPinFactory",
    "SimulatedChange",
    "UnknownDevice",
    "WrongDeviceKind",
    "WrongEventLoop",
    "load_board_config",
]
