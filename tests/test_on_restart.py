"""``on_restart`` (DESIGN §11) with mock pins over a real SQLite file: a workflow waits in a DELAY
with the valve and the pump on, the power goes (the board closes at its safe values), and a new
agent run (a new builder and a new board, opened at safe values) recovers it. The exact pin
history of the new board shows what each rule does: rollback undoes at once, restore drives the
outputs back then goes on, resume goes on as they are."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from _hw_fixtures import DEVICES, mock_pins, states

from agent import SQLiteStore, WorkflowBuilder, WorkflowStatus, _recovery
from agent._clock import FakeClock
from agent._engine import Workflow
from hardware import Board

S = WorkflowStatus


def out(name: str, device: str, value: bool, undo: str = "restore_output") -> dict[str, Any]:
    return {
        "name": name,
        "function": "hardware.steps.set_output",
        "compensate_function": f"hardware.steps.{undo}",
        "params": {"device": device, "value": value},
    }


def write(tmp_path: Path, on_restart: str | None, *, max_lateness: float | None = None) -> Path:
    pump_off = out("Pump_Off", "pump", False, "safe_output")
    if max_lateness is not None:
        pump_off["max_lateness"] = max_lateness
    body: dict[str, Any] = {
        "workflow_type": "Soak",
        "workflow_version": "1.0.0",
        "initial_state_model": "hardware.HardwareState",
        "saga_mode": True,
        "resources": ["valve", "pump"],
        "steps": [
            out("Open_Valve", "valve", True),
            out("Start_Pump", "pump", True),
            {"name": "Soak", "type": "DELAY", "duration": 5},
            pump_off,
            out("Valve_Off", "valve", False, "safe_output"),
        ],
    }
    if on_restart is not None:
        body["on_restart"] = on_restart
    path = tmp_path / "soak.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
    return path


async def soak_then_power_cut(path: Path, db: Path, clock: FakeClock) -> str:
    with mock_pins() as factory, Board(devices=DEVICES, pin_factory=factory) as board:
        builder = WorkflowBuilder([path], hardware=board, clock=clock)
        async with SQLiteStore(db) as store:
            await builder.start_timers(store, lambda wf: None)
            wf = await builder.create_workflow("Soak", {}, store=store)
            assert await wf.run() is S.ACTIVE  # waiting in Soak
            assert states(board, "valve") == [False, True]
            assert states(board, "pump") == [False, True]
            await builder.stop_timers()
            return wf.id


async def restart(
    path: Path, db: Path, clock: FakeClock, board: Board, store: SQLiteStore
) -> tuple[WorkflowBuilder, list[Workflow]]:
    builder = WorkflowBuilder([path], hardware=board, clock=clock)
    await builder.start_timers(store, lambda wf: None)
    await _recovery.mark_interrupted_attempts(store)
    handed: list[Workflow] = []
    async for page in _recovery.pages(builder, store):
        handed.extend(page)
    return builder, handed


@pytest.mark.parametrize("rule", ["rollback", None])  # None: the default with resources
async def test_rollback_undoes_at_once(tmp_path: Path, rule: str | None) -> None:
    clock, db = FakeClock(), tmp_path / "edgesaga.db"
    path = write(tmp_path, rule)
    wid = await soak_then_power_cut(path, db, clock)
    clock.advance(1)
    with mock_pins() as factory, Board(devices=DEVICES, pin_factory=factory) as board:
        async with SQLiteStore(db) as store:
            builder, handed = await restart(path, db, clock, board, store)
            assert [wf.id for wf in handed] == [wid]
            assert await handed[0].run() is S.FAILED_ROLLED_BACK
            assert handed[0].progress.compensated == ("Start_Pump", "Open_Valve")
            assert handed[0].error is not None
            assert "on_restart: rollback" in handed[0].error
            # Each compensation put back the value from before its step: off, as they already
            # are, so the pins never moved (a set to the value a pin has is no change).
            assert states(board, "valve") == [False]
            assert states(board, "pump") == [False]
            await builder.stop_timers()


async def test_restore_drives_the_outputs_back_then_goes_on(tmp_path: Path) -> None:
    clock, db = FakeClock(), tmp_path / "edgesaga.db"
    path = write(tmp_path, "restore")
    wid = await soak_then_power_cut(path, db, clock)
    clock.advance(1)
    with mock_pins() as factory, Board(devices=DEVICES, pin_factory=factory) as board:
        async with SQLiteStore(db) as store:
            builder, handed = await restart(path, db, clock, board, store)
            assert handed == []  # restored, then parked in its Soak again
            assert states(board, "valve") == [False, True]
            assert states(board, "pump") == [False, True]
            clock.advance(4)
            wf = await builder.load_workflow(wid, store)
            assert await wf.run() is S.COMPLETED
            assert states(board, "valve") == [False, True, False]
            assert states(board, "pump") == [False, True, False]
            await builder.stop_timers()


async def test_resume_goes_on_with_the_outputs_as_they_are(tmp_path: Path) -> None:
    clock, db = FakeClock(), tmp_path / "edgesaga.db"
    path = write(tmp_path, "resume")
    wid = await soak_then_power_cut(path, db, clock)
    clock.advance(1)
    with mock_pins() as factory, Board(devices=DEVICES, pin_factory=factory) as board:
        async with SQLiteStore(db) as store:
            builder, handed = await restart(path, db, clock, board, store)
            assert handed == []
            assert states(board, "valve") == [False]
            clock.advance(4)
            wf = await builder.load_workflow(wid, store)
            assert await wf.run() is S.COMPLETED
            assert wf.progress.completed[-2:] == ("Pump_Off", "Valve_Off")
            assert states(board, "valve") == [False]  # never driven back on
            assert states(board, "pump") == [False]
            await builder.stop_timers()


async def test_restore_is_refused_by_max_lateness_of_the_next_step(tmp_path: Path) -> None:
    clock, db = FakeClock(), tmp_path / "edgesaga.db"
    path = write(tmp_path, "restore", max_lateness=60)
    wid = await soak_then_power_cut(path, db, clock)
    clock.advance(7200)  # two hours without power; the Soak ended long ago
    with mock_pins() as factory, Board(devices=DEVICES, pin_factory=factory) as board:
        async with SQLiteStore(db) as store:
            builder, handed = await restart(path, db, clock, board, store)
            assert [wf.id for wf in handed] == [wid]  # late: driven at once
            wf = handed[0]
            assert await wf.run() is S.FAILED_ROLLED_BACK
            assert wf.error is not None
            assert "max_lateness of 60 s" in wf.error
            # Restored, then undone by the rollback the missed deadline started.
            assert states(board, "valve") == [False, True, False]
            assert states(board, "pump") == [False, True, False]
            await builder.stop_timers()
