"""The daily irrigation job (workflows/irrigation/daily.yaml, DailyIrrigation) and the agent
config that schedules it (workflows/irrigation/agent.yaml): run through the real engine on mock
pins with a real SQLite file, its ten-minute Soak compressed to a fraction of a second the way the
demo compresses it (``demo.job_definition``). Each test asserts the path (the journal) and the
exact history of every pin it drives."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from gpiozero.pins.mock import MockFactory

from agent import SQLiteStore, WorkflowBuilder
from agent._config import load_config
from agent._schedules import next_fire
from hardware import Board, load_board_config
from tests._hw_fixtures import states
from workflows.irrigation import demo

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
IRRIGATION = ROOT / "workflows" / "irrigation"
SOAK = 0.3  # seconds the tests' Soak lasts (600 on a board)


def journal_of(rows: list[Any]) -> list[tuple[str, str, str]]:
    return [(j.step, j.phase, j.outcome) for j in rows]


@pytest.fixture
def garden(mock_factory: MockFactory) -> Any:
    """A board wired like workflows/irrigation/garden.yaml, on mock pins."""
    with Board.from_config(
        load_board_config(IRRIGATION / "garden.yaml"), pin_factory=mock_factory
    ) as b:
        yield b


def job(tmp_path: Path, *, level_timeout: float | None = None) -> Path:
    """daily.yaml with the Soak compressed (and the float switch's wait shortened if asked)."""
    text = demo.job_definition(SOAK)
    if level_timeout is not None:
        assert "timeout: 3," in text
        text = text.replace("timeout: 3,", f"timeout: {level_timeout},")
    path = tmp_path / "daily.yaml"
    path.write_text(text)
    return path


def timed(builder: WorkflowBuilder) -> dict[str, float]:
    """time.monotonic() of each step_started / step_completed event, by "event:step"."""
    seen: dict[str, float] = {}

    def observer(wf: Any, event: dict[str, Any]) -> None:
        seen.setdefault(f"{event['event']}:{event.get('step')}", time.monotonic())

    builder.observers.append(observer)
    return seen


async def level_after(board: Board, seconds: float) -> None:
    await asyncio.sleep(seconds)
    await asyncio.get_running_loop().run_in_executor(None, board.set_input, "level", True)


def test_the_bundled_job_asks_the_soil_and_soaks_ten_minutes() -> None:
    text = (IRRIGATION / "daily.yaml").read_text()
    assert demo.SOAK in text  # what the demo and these tests compress
    builder = WorkflowBuilder(definitions=[IRRIGATION])
    loaded = builder.definition("DailyIrrigation")
    soak = loaded.step("Soak").spec
    assert soak.type == "DELAY"
    assert soak.duration == 600
    assert soak.on_late == "fail"
    # after an outage the run is undone with the pump off (the YAML's comments say why), and
    # the valve does not open on a soil reading more than 15 minutes old
    assert loaded.spec.on_restart == "rollback"
    assert loaded.step("Open_Valve").spec.max_lateness == 900
    assert [s.spec.name for s in loaded.steps] == [
        "Check_Soil",
        "Open_Valve",
        "Start_Pump",
        "Soak",
        "Wait_For_Level",
        "Stop_Pump",
        "Close_Valve",
    ]


async def test_dry_soil_waters_soaks_and_shuts_everything(garden: Board, tmp_path: Path) -> None:
    garden.set_input("soil", True)
    builder = WorkflowBuilder(definitions=[job(tmp_path)], hardware=garden)
    seen = timed(builder)
    async with SQLiteStore(tmp_path / "db") as store:
        filler = asyncio.create_task(level_after(garden, SOAK + 0.1))
        try:
            wf = await builder.start_workflow("DailyIrrigation", {"zone": "B"}, store=store)
        finally:
            await filler
        journal = await store.journal(wf.id)
    assert wf.status == "COMPLETED"
    assert wf.state.level_reached is True
    assert list(wf.progress.completed) == [
        "Check_Soil",
        "Open_Valve",
        "Start_Pump",
        "Soak",
        "Wait_For_Level",
        "Stop_Pump",
        "Close_Valve",
    ]
    # the Soak is a timer, not a step that runs: no journal row of its own
    assert journal_of(journal) == [
        ("Check_Soil", "forward", "completed"),
        ("Open_Valve", "forward", "completed"),
        ("Start_Pump", "forward", "completed"),
        ("Wait_For_Level", "forward", "completed"),
        ("Stop_Pump", "forward", "completed"),
        ("Close_Valve", "forward", "completed"),
    ]
    assert states(garden, "valve") == [False, True, False]
    assert states(garden, "pump") == [False, True, False]
    # never early: the water ran for the whole Soak
    assert seen["step_completed:Soak"] - seen["step_started:Soak"] >= SOAK


async def test_wet_soil_ends_the_job_with_nothing_switched(garden: Board, tmp_path: Path) -> None:
    garden.set_input("soil", False)
    builder = WorkflowBuilder(definitions=[job(tmp_path)], hardware=garden)
    async with SQLiteStore(tmp_path / "db") as store:
        wf = await builder.start_workflow("DailyIrrigation", store=store)
        journal = await store.journal(wf.id)
    assert wf.status == "COMPLETED"
    assert journal_of(journal) == [("Check_Soil", "forward", "completed")]
    assert states(garden, "valve") == [False]
    assert states(garden, "pump") == [False]


async def test_no_level_after_the_soak_rolls_the_job_back(garden: Board, tmp_path: Path) -> None:
    garden.set_input("soil", True)
    builder = WorkflowBuilder(definitions=[job(tmp_path, level_timeout=0.2)], hardware=garden)
    async with SQLiteStore(tmp_path / "db") as store:
        wf = await builder.start_workflow("DailyIrrigation", store=store)  # the level never comes
        journal = await store.journal(wf.id)
    assert wf.status == "FAILED_ROLLED_BACK"
    assert "DeviceTimeout" in (wf.error or "")
    assert journal_of(journal) == [
        ("Check_Soil", "forward", "completed"),
        ("Open_Valve", "forward", "completed"),
        ("Start_Pump", "forward", "completed"),
        ("Wait_For_Level", "forward", "failed"),
        ("Start_Pump", "compensate", "completed"),
        ("Open_Valve", "compensate", "completed"),
    ]
    assert states(garden, "valve") == [False, True, False]
    assert states(garden, "pump") == [False, True, False]


def test_the_example_config_schedules_the_job_at_six_and_catches_up_once() -> None:
    cfg = load_config(IRRIGATION / "agent.yaml")
    (schedule,) = cfg.schedules
    assert schedule.workflow_type == "DailyIrrigation"
    assert schedule.missed == "run_once"
    assert schedule.overlap == "skip"
    assert not cfg.clock.assume_synchronized  # a Pi without an RTC: nothing fires before sync
    # 05:30 in Berlin on a winter day (UTC+1): the next fire is 06:00 local, 05:00 UTC
    fire = next_fire(schedule, datetime(2026, 12, 2, 4, 30, tzinfo=UTC))
    assert fire is not None
    assert fire.astimezone(UTC) == datetime(2026, 12, 2, 5, 0, tzinfo=UTC)
    # and the config's devices are the ones the job names as its resources
    assert cfg.hardware is not None
    assert {"soil", "valve", "pump", "level"} <= set(cfg.hardware.devices)
