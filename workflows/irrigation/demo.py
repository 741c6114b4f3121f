"""The Irrigation part of ``edgesaga demo``: the workflow on mock pins, twice (the float switch
closes in time, then never); with ``edgesaga demo irrigation`` also the control-flow examples
(:func:`run_flow_demo`): SoilIrrigation on dry soil and on wet soil (the run skipped), and TwoBeds
driving two valves at once, and DailyIrrigation (the 06:00 job, daily.yaml) with its ten-minute
Soak compressed to seconds (:func:`job_definition`)."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from agent import SQLiteStore, Workflow, WorkflowBuilder
from hardware import Board, load_board_config

RULE = "=" * 70
HERE = Path(__file__).parent
DEVICES = HERE / "devices.yaml"
GARDEN = HERE / "garden.yaml"  # devices.yaml's wiring plus the soil sensor and two beds' valves
JOB = HERE / "daily.yaml"  # the 06:00 job (DailyIrrigation); agent.yaml schedules it
SOAK = "duration: 600 "  # the Soak's line in daily.yaml, which job_definition() compresses
DEMO_SOAK = 2.0  # seconds the demo's Soak lasts


def job_definition(soak_seconds: float) -> str:
    """daily.yaml with its ten-minute Soak shortened to ``soak_seconds`` (the demo, the tests)."""
    text = JOB.read_text(encoding="utf-8")
    if SOAK not in text:
        raise ValueError(f"{JOB} has no {SOAK.strip()!r} line to compress.")
    return text.replace(SOAK, f"duration: {soak_seconds:g} ")


def _pins(board: Board) -> str:
    def show(v: bool | float) -> str:
        if isinstance(v, bool):
            return "ON " if v else "off"
        return f"{v:.2f}"

    return "  ".join(f"{name}={show(value)}" for name, value in board.snapshot().items())


async def _one(
    builder: WorkflowBuilder, store: SQLiteStore, board: Board, *, level_arrives: bool
) -> Workflow:
    print("\n" + RULE)
    print(
        " IRRIGATION on mock pins: "
        + (
            "the float switch closes after 1.5 s"
            if level_arrives
            else "the float switch never closes"
        )
    )
    print(RULE)
    board.set_input("level", False)
    print(f"  start        {_pins(board)}")

    def observer(workflow: Workflow, event: dict[str, Any]) -> None:
        name = event["event"]
        if name in ("step_completed", "compensation_completed", "step_failed"):
            label = {
                "step_completed": "done",
                "compensation_completed": "undone",
                "step_failed": "FAILED",
            }[name]
            print(f"  {label:<6} {event['step']:<16} {_pins(board)}")
            if event.get("error"):
                print(f"         {event['error']}")
        elif name == "status_changed" and event["status"] == "COMPENSATING":
            print("  rolling back: compensations run newest first")

    builder.observers.append(observer)
    sim = None
    try:
        if level_arrives:
            sim = asyncio.create_task(board.simulate(), name="simulate-level")
        wf = await builder.start_workflow("Irrigation", {"zone": "A"}, store=store)
    finally:
        builder.observers.remove(observer)
        if sim is not None:
            sim.cancel()
            await asyncio.gather(sim, return_exceptions=True)
    print(f"  final        {_pins(board)}")
    print(f"  status       {wf.status.value}")
    return wf


async def run_demo(store: SQLiteStore) -> list[bool]:
    """Run the irrigation demo; returns whether each run ended as it should."""
    config = load_board_config(DEVICES)
    with Board.from_config(config, pin_factory="mock") as board:
        builder = WorkflowBuilder(definitions=[HERE], hardware=board)
        ok = await _one(builder, store, board, level_arrives=True)
        bad = await _one(builder, store, board, level_arrives=False)
        safe = not board["pump"].value and not board["valve"].value
    print(f"\nIrrigation (level arrives): {ok.status.value}")
    print(f"Irrigation (level never arrives): {bad.status.value}; pump and valve off: {safe}")
    return [ok.status == "COMPLETED", bad.status == "FAILED_ROLLED_BACK", safe]


async def _flow_one(
    builder: WorkflowBuilder, store: SQLiteStore, board: Board, workflow_type: str, title: str
) -> Workflow:
    print("\n" + RULE)
    print(f" {workflow_type} on mock pins: {title}")
    print(RULE)
    print(f"  start        {_pins(board)}")

    def observer(workflow: Workflow, event: dict[str, Any]) -> None:
        if event["event"] in ("step_completed", "compensation_completed"):
            label = "done" if event["event"] == "step_completed" else "undone"
            print(f"  {label:<6} {event['step']:<16} {_pins(board)}")

    builder.observers.append(observer)
    sim = asyncio.create_task(board.simulate([{"at": 0.2, "device": "level", "value": True}]))
    try:
        wf = await builder.start_workflow(workflow_type, {"zone": "A"}, store=store)
    finally:
        builder.observers.remove(observer)
        sim.cancel()
        await asyncio.gather(sim, return_exceptions=True)
    ran = list(wf.progress.completed)
    print(f"  path         {' -> '.join(ran)}")
    print(f"  final        {_pins(board)}")
    print(f"  status       {wf.status.value}")
    return wf


async def run_flow_demo(store: SQLiteStore) -> tuple[list[bool], list[str]]:
    """The control-flow examples on mock pins (garden.yaml): whether each run ended as it should,
    and the summary's lines."""
    config = load_board_config(GARDEN)
    with Board.from_config(config, pin_factory="mock") as board:
        builder = WorkflowBuilder(definitions=[HERE], hardware=board)
        board.set_input("level", False)
        board.set_input("soil", True)
        dry = await _flow_one(builder, store, board, "SoilIrrigation", "the soil is dry")
        board.set_input("level", False)
        board.set_input("soil", False)
        wet = await _flow_one(builder, store, board, "SoilIrrigation", "the soil is wet")
        board.set_input("level", False)
        beds = await _flow_one(builder, store, board, "TwoBeds", "both beds at once")
        off = not any(board[name].value for name in ("valve", "pump", "valve_a", "valve_b"))
    watered = "Open_Valve" in dry.progress.completed
    skipped = list(wet.progress.completed) == ["Check_Soil"]
    job_ok, job_line = await run_job_demo(store)
    return (
        [
            dry.status == "COMPLETED" and watered,
            wet.status == "COMPLETED" and skipped,
            beds.status == "COMPLETED",
            off,
            job_ok,
        ],
        [
            f"SoilIrrigation (dry soil): {dry.status.value}, watered",
            f"SoilIrrigation (wet soil): {wet.status.value}, skipped after Check_Soil",
            f"TwoBeds (two valves at once): {beds.status.value}; all valves off: {off}",
            job_line,
        ],
    )


async def run_job_demo(store: SQLiteStore) -> tuple[bool, str]:
    """DailyIrrigation on mock pins with a Soak of DEMO_SOAK seconds: whether it ended as it
    should (watered, soaked at least that long, everything off), and the summary's line."""
    print("\n" + RULE)
    print(
        f" DailyIrrigation on mock pins: the 06:00 job, its Soak {DEMO_SOAK:g} s instead of 600 s"
    )
    print(RULE)
    with tempfile.TemporaryDirectory(prefix="edgesaga-demo-") as tmp:
        path = Path(tmp) / "daily.yaml"
        path.write_text(job_definition(DEMO_SOAK), encoding="utf-8")
        config = load_board_config(GARDEN)
        with Board.from_config(config, pin_factory="mock") as board:
            builder = WorkflowBuilder(definitions=[path], hardware=board)
            board.set_input("level", False)
            board.set_input("soil", True)
            print(f"  start        {_pins(board)}")
            marks: dict[str, float] = {}

            def observer(workflow: Workflow, event: dict[str, Any]) -> None:
                name, step = event["event"], event.get("step")
                if name == "step_started" and step == "Soak":
                    marks["soak"] = time.monotonic()
                    print(f"  soaking      {_pins(board)}  (a durable DELAY)")
                elif name == "step_completed":
                    if step == "Soak":
                        marks["soaked"] = time.monotonic()
                    print(f"  done   {step:<16} {_pins(board)}")

            builder.observers.append(observer)
            level = [{"at": DEMO_SOAK + 0.3, "device": "level", "value": True}]
            sim = asyncio.create_task(board.simulate(level))
            try:
                wf = await builder.start_workflow("DailyIrrigation", {"zone": "A"}, store=store)
            finally:
                builder.observers.remove(observer)
                sim.cancel()
                await asyncio.gather(sim, return_exceptions=True)
            off = not board["pump"].value and not board["valve"].value
            print(f"  final        {_pins(board)}")
            print(f"  status       {wf.status.value}")
    soaked = marks.get("soaked", 0.0) - marks.get("soak", marks.get("soaked", 0.0))
    ok = wf.status == "COMPLETED" and off and soaked >= DEMO_SOAK
    line = (
        f"DailyIrrigation (the 06:00 job, Soak {DEMO_SOAK:g} s): {wf.status.value}, "
        f"soaked {soaked:.1f} s; pump and valve off: {off}"
    )
    return ok, line
