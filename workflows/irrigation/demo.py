"""The Irrigation part of ``edgesaga demo``: the workflow on mock pins, twice (the float switch
closes in time, then never)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from agent import SQLiteStore, Workflow, WorkflowBuilder
from hardware import Board, load_board_config

RULE = "=" * 70
HERE = Path(__file__).parent
DEVICES = HERE / "devices.yaml"


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
