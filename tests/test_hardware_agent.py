"""Hardware through the engine and the agent: resource leases, safe state after a SIGKILL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agent import SQLiteStore, WorkflowBuilder
from agent._socket import request
from hardware import Board
from tests._hw_fixtures import states

ROOT = Path(__file__).resolve().parents[1]
HW = ROOT / "tests" / "flows" / "hw"


async def test_same_resource_runs_one_after_the_other_disjoint_alongside(board, tmp_path) -> None:
    builder = WorkflowBuilder(definitions=[HW], hardware=board)
    log: list[tuple[str, str, str | None, float]] = []

    def observer(wf: Any, event: dict[str, Any]) -> None:
        log.append((wf.workflow_type, event["event"], event["step"], time.monotonic()))

    builder.observers.append(observer)
    async with SQLiteStore(tmp_path / "db") as store:
        a, b, c = await asyncio.gather(
            builder.start_workflow("HwPumpA", store=store),
            builder.start_workflow("HwPumpB", store=store),
            builder.start_workflow("HwValve", store=store),
        )
    assert (a.status, b.status, c.status) == ("COMPLETED",) * 3

    def at(wtype: str, event: str, step: str) -> float:
        return next(t for w, e, s, t in log if w == wtype and e == event and s == step)

    # never interleaved on the pump: the first holder switched it off before the second switched it on
    first, second = sorted(["HwPumpA", "HwPumpB"], key=lambda w: at(w, "step_started", "Pump_On"))
    assert at(first, "step_completed", "Pump_Off") < at(second, "step_started", "Pump_On")
    assert states(board, "pump") == [False, True, False, True, False]
    # the valve workflow did not wait for the pump workflows
    assert at("HwValve", "step_completed", "Valve_Off") < at(second, "step_started", "Pump_On")
    assert at("HwValve", "step_started", "Valve_On") < at(first, "step_completed", "Pump_Off")
    assert states(board, "valve") == [False, True, False]
    assert builder.leases.holder("pump") is None
    assert builder.leases.holder("valve") is None


@contextlib.asynccontextmanager
async def second_waits_for_the_pump(board: Board, db: Path):
    """Two workflows needing the pump: the first runs, the second waits for its lease."""
    builder = WorkflowBuilder(definitions=[HW], hardware=board)
    async with SQLiteStore(db) as store:
        first = await builder.create_workflow("HwPumpA", store=store)
        second = await builder.create_workflow("HwPumpB", store=store)
        t1 = asyncio.create_task(first.run())
        await asyncio.sleep(0.05)
        t2 = asyncio.create_task(second.run())
        await asyncio.sleep(0.05)
        yield store, first, second, t1, t2


async def test_a_waiting_workflow_says_what_it_waits_for(board, tmp_path) -> None:
    async with second_waits_for_the_pump(board, tmp_path / "db") as (_, first, second, t1, t2):
        assert second.status == "ACTIVE"
        assert second.waiting_for == ["pump"]
        assert first.waiting_for == []
        await asyncio.gather(t1, t2)
        assert second.waiting_for == []
        assert second.status == "COMPLETED"


# -- the irrigation workflow and a custom GPIO step, through the real engine ---------------------


async def test_irrigation_completes_when_the_level_arrives(board, tmp_path) -> None:
    builder = WorkflowBuilder(definitions=[ROOT / "workflows" / "irrigation"], hardware=board)
    loop = asyncio.get_running_loop()
    # the float switch closes 50 ms in, driven from another thread like a real GPIO callback
    timer = loop.call_later(
        0.05,
        lambda: asyncio.get_running_loop().run_in_executor(None, board.set_input, "level", True),
    )
    async with SQLiteStore(tmp_path / "db") as store:
        wf = await builder.start_workflow("Irrigation", {"zone": "B"}, store=store)
        journal = await store.journal(wf.id)
    timer.cancel()
    assert wf.status == "COMPLETED"
    assert wf.state.level_reached is True
    assert states(board, "valve") == [False, True, False]
    assert states(board, "pump") == [False, True, False]
    assert [(j.step, j.phase, j.outcome) for j in journal] == [
        ("Open_Valve", "forward", "completed"),
        ("Start_Pump", "forward", "completed"),
        ("Wait_For_Level", "forward", "completed"),
        ("Stop_Pump", "forward", "completed"),
        ("Close_Valve", "forward", "completed"),
    ]


async def test_irrigation_times_out_and_rolls_back(board, tmp_path) -> None:
    text = (ROOT / "workflows" / "irrigation" / "irrigation.yaml").read_text()
    assert "timeout: 3," in text
    (tmp_path / "irrigation.yaml").write_text(text.replace("timeout: 3,", "timeout: 0.2,"))
    builder = WorkflowBuilder(definitions=[tmp_path / "irrigation.yaml"], hardware=board)
    async with SQLiteStore(tmp_path / "db") as store:
        wf = await builder.start_workflow("Irrigation", store=store)
        journal = await store.journal(wf.id)
    assert wf.status == "FAILED_ROLLED_BACK"
    assert "DeviceTimeout" in (wf.error or "")
    assert states(board, "valve") == [False, True, False]
    assert states(board, "pump") == [False, True, False]
    assert [(j.step, j.phase, j.outcome) for j in journal] == [
        ("Open_Valve", "forward", "completed"),
        ("Start_Pump", "forward", "completed"),
        ("Wait_For_Level", "forward", "failed"),
        ("Start_Pump", "compensate", "completed"),
        ("Open_Valve", "compensate", "completed"),
    ]


async def test_custom_step_turns_the_pump_on_and_raises_then_pump_is_off(board, tmp_path) -> None:
    builder = WorkflowBuilder(definitions=[HW], hardware=board)
    async with SQLiteStore(tmp_path / "db") as store:
        wf = await builder.start_workflow("HwCustomFail", store=store)
    assert wf.status == "FAILED_ROLLED_BACK"
    assert "flow sensor reports no flow" in (wf.error or "")
    # the failed step's own compensation does not run (it never completed); the workflow's
    # terminal failure drives its resources to their safe values, so the pump is off
    assert states(board, "pump") == [False, True, False]
    assert states(board, "valve") == [False, True, False]


def _start_agent(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("NOTIFY_SOCKET", None)
    with log.open("ab") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "agent._cli", "run", "--config", str(cfg)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _ask(sock: Path, command: str, **fields: Any) -> dict[str, Any] | None:
    try:
        return request(sock, command, timeout=5, **fields)
    except OSError:
        return None


@pytest.mark.slow
def test_sigkill_with_the_pump_on_then_safe_before_recovery(tmp_path: Path) -> None:
    mark = tmp_path / "hold.mark"
    defs = tmp_path / "defs"
    defs.mkdir()
    (defs / "crash_pump.yaml").write_text(
        (HW / "crash_pump.yaml.tmpl").read_text().replace("MARK", str(mark))
    )
    sock = tmp_path / "control.sock"
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        json.dumps(
            {
                "device_id": "hw-crash",
                "database": str(tmp_path / "db" / "edgesaga.db"),
                "control_socket": str(sock),
                "definitions": [str(defs), str(HW)],
                "logging": {"level": "INFO"},
                "hardware": {
                    "pin_factory": "mock",
                    # initial on: the agent ignores it and opens the pump at its safe value
                    "devices": {
                        "pump": {"kind": "output", "pin": 27, "initial": True, "safe": False}
                    },
                },
            }
        )
    )
    log = tmp_path / "agent.log"
    proc = _start_agent(cfg, log)
    try:
        _wait_for(lambda: _ask(sock, "status"), 15, "the agent's control socket")
        reply = _ask(sock, "start", request_id="r1", workflow_type="HwCrashPump")
        assert reply is not None
        assert reply["ok"], reply
        wid = reply["workflow_id"]
        _wait_for(mark.exists, 10, "the Hold step to start")
        pins = _ask(sock, "pins")
        assert pins is not None
        assert pins["pins"]["pump"] is True
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)

    mark.unlink()
    proc = _start_agent(cfg, log)
    try:

        def finished() -> dict[str, Any] | None:
            got = _ask(sock, "get", request_id="g", workflow_id=wid)
            return got if got and got.get("status") == "COMPLETED" else None

        info = _wait_for(finished, 20, "the recovered workflow to complete")
        history = _ask(sock, "pins", history=True)
        assert history is not None
        # the mock pin's log in the restarted agent: opened at its safe value (off), not at
        # `initial`; nothing switched it on again (Pump_On completed before the crash and never
        # runs again) and Pump_Off found it off already.
        assert [bool(v) for v in history["history"]["pump"]] == [False]
        steps = [(j["step"], j["outcome"]) for j in info["journal"]]
        assert steps == [
            ("Pump_On", "completed"),
            ("Hold", "interrupted"),
            ("Hold", "completed"),
            ("Pump_Off", "completed"),
        ]
        text = log.read_text()
        second_run = text[text.rindex("outputs set to their safe values") :]
        assert "recovered" in second_run  # safe state came before recovery in the restarted agent
        assert mark.read_text().endswith("attempt 2\n")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


async def test_a_workflow_waiting_for_its_resources_can_be_cancelled(board, tmp_path) -> None:
    async with second_waits_for_the_pump(board, tmp_path / "db") as (store, first, second, t1, t2):
        assert second.waiting_for == ["pump"]
        await second.cancel("no longer needed")
        assert await asyncio.wait_for(t2, 1) == "CANCELLED"
        assert not first.status.is_terminal  # the holder was not disturbed:
        assert board["pump"].value is True  # its pump still runs (no safe state for a non-holder)
        assert await t1 == "COMPLETED"
        assert (await store.journal(second.id)) == []  # it never ran a step
    assert states(board, "pump") == [False, True, False]
