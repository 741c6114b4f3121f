"""The engine remembers what outputs a workflow commanded: a bundled GPIO step reports the values it
set on its context, the engine writes them into the journal in the step's own commit, and the
step's compensation gets them back from there (also after a restart). The user's state model
needs no ``gpio`` field for it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from _hw_fixtures import DEVICES, mock_pins, states

from agent import SQLiteStore, WorkflowBuilder, WorkflowStatus
from agent._store import SCHEMA_VERSION, JournalEnd, JournalStart, NewInstance, Transition
from hardware import Board

S = WorkflowStatus


def plain_definition(directory: Path, *, fail_last: bool = True) -> Path:
    """Open the valve, start the pump, set the fan, then a step that fails: with a plain
    ``BaseModel`` state (no gpio field)."""
    (directory / "plainhw_steps.py").write_text(
        "from pydantic import BaseModel\n\n"
        "class Plain(BaseModel):\n"
        "    note: str = ''\n\n"
        "async def boom(state, context):\n"
        "    raise RuntimeError('dry run over')\n\n"
        "async def fine(state, context):\n"
        "    return None\n",
        encoding="utf-8",
    )
    steps: list[dict[str, Any]] = [
        {
            "name": "Open_Valve",
            "function": "hardware.steps.set_output",
            "compensate_function": "hardware.steps.restore_output",
            "params": {"device": "valve", "value": True},
        },
        {
            "name": "Start_Pump",
            "function": "hardware.steps.set_output",
            "compensate_function": "hardware.steps.restore_output",
            "params": {"device": "pump", "value": True},
        },
        {
            "name": "Fan_Up",
            "function": "hardware.steps.set_pwm",
            "compensate_function": "hardware.steps.restore_pwm",
            "params": {"device": "fan", "value": 0.9},
        },
        {"name": "Last", "function": "plainhw_steps.boom" if fail_last else "plainhw_steps.fine"},
    ]
    body = {
        "workflow_type": "PlainHardware",
        "workflow_version": "1.0.0",
        "initial_state_model": "plainhw_steps.Plain",
        "saga_mode": True,
        "steps": steps,
    }
    path = directory / "plain.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
    return path


async def test_plain_state_workflow_runs_and_rolls_back_with_exact_pin_histories(
    tmp_path: Path, monkeypatch: Any
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    path = plain_definition(tmp_path)
    with mock_pins() as factory, Board(devices=DEVICES, pin_factory=factory) as board:
        board["fan"].set(0.4)
        builder = WorkflowBuilder(definitions=[path], hardware=board)
        async with SQLiteStore(tmp_path / "db.sqlite") as store:
            wf = await builder.create_workflow("PlainHardware", {}, store=store)
            assert await wf.run() is S.FAILED_ROLLED_BACK
            commanded = await store.commanded_outputs(wf.id)
        assert states(board, "valve") == [False, True, False]
        assert states(board, "pump") == [False, True, False]
        assert states(board, "fan") == [0.0, 0.4, 0.9, 0.4]
    assert commanded == {
        "Open_Valve": {"valve": {"previous": False, "value": True}},
        "Start_Pump": {"pump": {"previous": False, "value": True}},
        "Fan_Up": {"fan": {"previous": 0.4, "value": 0.9}},
    }


async def test_outputs_are_committed_with_the_step_and_read_after_a_restart(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """The compensation of a step that ran before a restart restores from the journal (not from
    memory): the valve was already open before the workflow, so it stays open."""
    monkeypatch.syspath_prepend(str(tmp_path))
    path = plain_definition(tmp_path)
    db = tmp_path / "db.sqlite"
    with mock_pins() as factory, Board(devices=DEVICES, pin_factory=factory) as board:
        board["valve"].set(True)
        builder = WorkflowBuilder(definitions=[path], hardware=board)
        async with SQLiteStore(db) as store:
            wf = await builder.create_workflow("PlainHardware", {}, store=store)
            await wf.next_step()  # Open_Valve, committed with what it commanded
        async with SQLiteStore(db) as store:
            again = await WorkflowBuilder(definitions=[path], hardware=board).load_workflow(
                wf.id, store
            )
            assert await again.run() is S.FAILED_ROLLED_BACK
        assert states(board, "valve") == [False, True]  # set True twice, restored to True
        assert states(board, "pump") == [False, True, False]


async def test_a_step_commanding_nothing_stores_nothing(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "db.sqlite") as store:
        first = Transition(
            "wf-1",
            S.ACTIVE,
            "One",
            None,
            "{}",
            "{}",
            1.0,
            journal=[JournalStart(1, "One", "forward", 1, 1.0)],
        )
        await store.create_instance(NewInstance("wf-1", "T", "1", "h", "{}", first))
        assert await store.commanded_outputs("wf-1") == {}
        outputs = json.dumps({"valve": {"previous": False, "value": True}})
        await store.commit(
            first._replace(
                journal=[
                    JournalEnd(1, "completed", 2.0, None, outputs),
                    JournalStart(2, "Two", "forward", 1, 2.0),
                ]
            )
        )
        await store.commit(first._replace(journal=[JournalEnd(2, "completed", 3.0)]))
        assert await store.commanded_outputs("wf-1") == {
            "One": {"valve": {"previous": False, "value": True}}
        }
        assert (await store.pragmas())["user_version"] == SCHEMA_VERSION
