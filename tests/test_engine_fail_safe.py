"""Fail safe at the engine level: shutdown while a workflow waits for a lease, an exception escaping
a workflow's driver, a state too big to store, unknown fields in initial data (issue 10).

Real parts: a SQLite file in ``tmp_path`` and a board on gpiozero's MockFactory. The agent-process
versions of the first two are in ``test_fail_safe.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent import SQLiteStore, WorkflowBuilder
from agent._config import AgentConfig
from agent._engine import Workflow
from agent._errors import InvalidData
from agent._runner import Runner
from agent._store import JournalStart, Transition
from hardware import Board
from tests._engine_fixtures import MODEL, STEPS, write_definition
from tests._engine_fixtures import step as engine_step
from tests._hw_fixtures import states
from tests.flows.engine.models import EngineState

HOLD = "tests.flows.hw.steps.hold"
SET = "hardware.steps.set_output"
RESTORE = "hardware.steps.restore_output"
SAFE = "hardware.steps.safe_output"


def _hw_definition(
    directory: Path,
    workflow_type: str,
    device: str,
    hold: float,
    *,
    then_fail: bool = False,
) -> Path:
    """``<Device>_On`` (compensated), ``Hold`` for ``hold`` seconds, then ``<Device>_Off`` — or,
    with ``then_fail``, a step that raises, so the rollback runs (``Hold`` is compensated too, by
    holding again)."""
    last: dict[str, Any] = (
        {"name": "Broken", "function": f"{STEPS}.fail"}
        if then_fail
        else {
            "name": f"{device.title()}_Off",
            "function": SET,
            "compensate_function": SAFE,
            "params": {"device": device, "value": False},
        }
    )
    body = {
        "workflow_type": workflow_type,
        "workflow_version": "1.0.0",
        "initial_state_model": "hardware.HardwareState",
        "saga_mode": True,
        "on_restart": "resume",  # these tests resume after a restart (rollback is the default)
        "resources": [device],
        "steps": [
            {
                "name": f"{device.title()}_On",
                "function": SET,
                "compensate_function": RESTORE,
                "automate_next": True,
                "params": {"device": device, "value": True},
            },
            {
                "name": "Hold",
                "function": HOLD,
                "automate_next": True,
                "params": {"seconds": hold},
                **({"compensate_function": HOLD} if then_fail else {}),
            },
            last,
        ],
    }
    path = directory / f"{workflow_type}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
    return path


async def _until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def _serving(runner: Runner) -> AsyncIterator[asyncio.Task[None]]:
    """``runner.serve()`` in a task; torn down with bounded waits even when a test fails."""
    serve = asyncio.create_task(runner.serve(), name="runner")
    try:
        yield serve
    finally:
        if not serve.done():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(runner.stop(0), 2)
        for _ in range(3):  # a task that swallowed one cancel gets another
            if serve.done():
                break
            serve.cancel()
            await asyncio.wait({serve}, timeout=1)


# -- #1: a stop while a second workflow waits for the first one's devices -------------------------


async def _two_on_the_pump(
    builder: WorkflowBuilder, store: SQLiteStore, runner: Runner, board: Board
) -> tuple[Workflow, Workflow]:
    first = await builder.create_workflow("PumpFirst", store=store)
    second = await builder.create_workflow("PumpSecond", store=store)
    runner.submit(first)
    await _until(lambda: board["pump"].value is True and first.current_step == "Hold")
    runner.submit(second)
    await _until(lambda: second.waiting_for == ["pump"])
    return first, second


@pytest.mark.parametrize("hold", [30.0, 0.3], ids=["step-outlives-grace", "step-ends-in-grace"])
async def test_stop_while_a_workflow_waits_for_a_lease_returns_and_outputs_end_safe(
    board: Board, tmp_path: Path, hold: float
) -> None:
    _hw_definition(tmp_path, "PumpFirst", "pump", hold)
    _hw_definition(tmp_path, "PumpSecond", "pump", hold)
    builder = WorkflowBuilder(definitions=[tmp_path], hardware=board)
    grace = 1.0
    runner = Runner(max_concurrent=4)
    async with SQLiteStore(tmp_path / "db") as store, _serving(runner) as serve:
        first, second = await _two_on_the_pump(builder, store, runner, board)
        started = time.monotonic()
        done, _ = await asyncio.wait({asyncio.ensure_future(runner.stop(grace))}, timeout=grace + 3)
        elapsed = time.monotonic() - started
        assert done, f"runner.stop({grace}) still running {elapsed:.1f} s later"
        cut = done.pop().result()
        await asyncio.wait_for(serve, 2)
        assert elapsed < grace + 1.0
        assert cut == (1 if hold > grace else 0)
        # Both stay ACTIVE for recovery; the second never ran a step.
        assert (await store.load_instance(first.id)).status == "ACTIVE"  # type: ignore[union-attr]
        assert (await store.load_instance(second.id)).status == "ACTIVE"  # type: ignore[union-attr]
        assert await store.journal(second.id) == []
    # Nobody holds or waits for the pump, and it ended at its safe value.
    assert builder.leases.holder("pump") is None
    assert second.waiting_for == []
    assert states(board, "pump") == [False, True, False]


async def test_after_a_stop_while_waiting_both_workflows_recover_and_complete(
    board: Board, tmp_path: Path
) -> None:
    _hw_definition(tmp_path, "PumpFirst", "pump", 0.3)
    _hw_definition(tmp_path, "PumpSecond", "pump", 0.3)
    runner = Runner(max_concurrent=4)
    async with SQLiteStore(tmp_path / "db") as store:
        builder = WorkflowBuilder(definitions=[tmp_path], hardware=board)
        async with _serving(runner) as serve:
            first, second = await _two_on_the_pump(builder, store, runner, board)
            await asyncio.wait_for(runner.stop(5), 5)
            await asyncio.wait_for(serve, 2)
        # A new agent (a new builder) on the same database resumes both, one after the other.
        again = WorkflowBuilder(definitions=[tmp_path], hardware=board)
        recovered = await asyncio.wait_for(again.recover(store), 10)
    assert sorted(w.id for w in recovered) == sorted([first.id, second.id])
    assert [w.status for w in recovered] == ["COMPLETED", "COMPLETED"]
    assert board["pump"].value is False
    # on (first), safe at the stop, first's Pump_Off finds it off, on and off (second)
    assert states(board, "pump") == [False, True, False, True, False]


# -- #3: an exception escaping a workflow's driver -------------------------------------------------


def _fail_commit(
    store: SQLiteStore,
    monkeypatch: pytest.MonkeyPatch,
    when: Callable[[Transition], bool],
    times: int,
) -> list[Transition]:
    """Make ``times`` commits, the first being one for which ``when`` holds, raise IntegrityError."""
    real = store.commit
    failed: list[Transition] = []

    async def commit(tr: Transition) -> None:
        if len(failed) < times and (failed or when(tr)):
            failed.append(tr)
            raise sqlite3.IntegrityError("UNIQUE constraint failed: journal.k")
        await real(tr)

    monkeypatch.setattr(store, "commit", commit)
    return failed


def _starts(step: str, phase: str = "forward") -> Callable[[Transition], bool]:
    return lambda tr: any(
        isinstance(j, JournalStart) and j.step == step and j.phase == phase for j in tr.journal
    )


async def _alerts(store: SQLiteStore, workflow_id: str) -> list[dict[str, Any]]:
    return [
        i.payload
        for i in await store.outbox_pending(limit=10_000)
        if i.kind == "alert" and i.workflow_id == workflow_id
    ]


def _tracebacks(caplog: pytest.LogCaptureFixture, workflow_id: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.exc_info and r.exc_info[0] is sqlite3.IntegrityError and workflow_id in r.getMessage()
    ]


async def test_exception_in_the_driver_fails_the_workflow_safely_and_retry_completes_it(
    board: Board, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _hw_definition(tmp_path, "Watering", "valve", 0.05)
    builder = WorkflowBuilder(definitions=[tmp_path], hardware=board)
    runner = Runner()
    async with SQLiteStore(tmp_path / "db") as store, _serving(runner):
        # The commit carrying Valve_On's result (and Hold's start) raises: the valve is open.
        failed = _fail_commit(store, monkeypatch, _starts("Hold"), times=1)
        wf = await builder.create_workflow("Watering", store=store)
        runner.submit(wf)
        assert await asyncio.wait_for(wf.wait(), 5) == "FAILED"
        assert len(failed) == 1
        assert board["valve"].value is False
        assert wf.error == "internal error: IntegrityError: UNIQUE constraint failed: journal.k"
        rec = await store.load_instance(wf.id)
        assert rec is not None
        assert (rec.status, rec.error, rec.current_step) == ("FAILED", wf.error, "Valve_On")
        assert [(j.step, j.outcome, j.error) for j in await store.journal(wf.id)] == [
            ("Valve_On", "failed", wf.error)
        ]
        [alert] = await _alerts(store, wf.id)
        assert alert["alert"] == "internal_error"
        assert alert["error"] == wf.error
        assert "retry" in alert["message"]
        assert _tracebacks(caplog, wf.id)
        assert builder.leases.holder("valve") is None

        await wf.prepare_retry()  # what `edgesaga retry` does
        runner.submit(wf)
        assert await asyncio.wait_for(wf.wait(), 5) == "COMPLETED"
    # open, closed by the fail-safe, open again on retry (Valve_On re-runs), closed at the end
    assert states(board, "valve") == [False, True, False, True, False]


async def test_exception_during_rollback_leaves_it_retryable_and_outputs_safe(
    board: Board, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The case: a workflow left COMPENSATING with the valve on, refusing cancel and retry.
    _hw_definition(tmp_path, "Watering", "valve", 0.01, then_fail=True)
    builder = WorkflowBuilder(definitions=[tmp_path], hardware=board)
    async with SQLiteStore(tmp_path / "db") as store:
        # The commit carrying Hold's compensation (and Valve_On's compensation start) raises.
        failed = _fail_commit(store, monkeypatch, _starts("Valve_On", "compensate"), times=1)
        wf = await asyncio.wait_for(builder.start_workflow("Watering", store=store), 5)
        assert len(failed) == 1
        assert wf.status == "COMPENSATION_FAILED"
        assert wf.error is not None
        assert wf.error.startswith("internal error: IntegrityError:")
        assert board["valve"].value is False
        assert wf.progress.compensation_failed == ("Hold", "Valve_On")  # both still due
        rec = await store.load_instance(wf.id)
        assert rec is not None
        assert rec.status == "COMPENSATION_FAILED"
        assert [(j.step, j.phase, j.outcome) for j in await store.journal(wf.id)] == [
            ("Valve_On", "forward", "completed"),
            ("Hold", "forward", "completed"),
            ("Broken", "forward", "failed"),
            ("Hold", "compensate", "failed"),
        ]
        [alert] = await _alerts(store, wf.id)
        assert alert["alert"] == "internal_error"
        assert _tracebacks(caplog, wf.id)
        assert builder.leases.holder("valve") is None

        assert await asyncio.wait_for(wf.retry(), 5) == "FAILED_ROLLED_BACK"
        assert wf.progress.compensated == ("Hold", "Valve_On")
    assert states(board, "valve") == [False, True, False]


async def test_when_even_the_failure_cannot_be_committed_retry_still_acts(
    board: Board, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _hw_definition(tmp_path, "Watering", "valve", 0.05)
    builder = WorkflowBuilder(definitions=[tmp_path], hardware=board)
    async with SQLiteStore(tmp_path / "db") as store:
        # The step's commit raises, and so does the commit recording the failure.
        failed = _fail_commit(store, monkeypatch, _starts("Hold"), times=2)
        wf = await asyncio.wait_for(builder.start_workflow("Watering", store=store), 5)
        assert len(failed) == 2
        assert failed[1].status == "FAILED"  # the fail-safe tried to record it
        assert wf.status == "FAILED"
        assert board["valve"].value is False
        assert _tracebacks(caplog, wf.id)
        rec = await store.load_instance(wf.id)
        assert rec is not None
        assert rec.status == "ACTIVE"
        assert builder.leases.holder("valve") is None

        assert await asyncio.wait_for(builder.retry(wf.id, store), 5) == wf
        assert wf.status == "COMPLETED"
        rec = await store.load_instance(wf.id)
        assert rec is not None
        assert rec.status == "COMPLETED"
    assert states(board, "valve") == [False, True, False, True, False]


# -- #8: the state size limit ----------------------------------------------------------------------


def big_note(state: Any, context: Any, *, size: int) -> dict[str, Any]:
    """A step whose result makes the state ``size`` characters bigger."""
    return {"note": "x" * size}


BIG = f"{__name__}.big_note"


def _big_definition(directory: Path, size: int) -> Path:
    return write_definition(
        directory,
        [
            engine_step("First", "record", "undo", automate_next=True),
            {"name": "Big", "function": BIG, "params": {"size": size}},
        ],
        saga_mode=True,
    )


async def test_a_step_result_beyond_the_default_limit_fails_the_step_and_rolls_back(
    tmp_path: Path,
) -> None:
    _big_definition(tmp_path, 2 * 1024 * 1024)
    builder = WorkflowBuilder(definitions=[tmp_path])
    async with SQLiteStore(tmp_path / "db") as store:
        wf = await builder.start_workflow("EngineTest", store=store)
        rec = await store.load_instance(wf.id)
        journal = await store.journal(wf.id)
    assert wf.status == "FAILED_ROLLED_BACK"  # saga rules apply
    assert wf.error is not None
    assert wf.error.startswith("Step 'Big' returned a state of 2.0 MiB of JSON; the limit is 1 MiB")
    assert "max_state_bytes" in wf.error
    assert [(j.step, j.phase, j.outcome) for j in journal] == [
        ("First", "forward", "completed"),
        ("Big", "forward", "failed"),
        ("First", "compensate", "completed"),
    ]
    assert rec is not None
    assert rec.state["note"] is None  # nothing of the oversized result was stored
    assert wf.state.note is None


async def test_the_limit_is_configurable_and_counts_utf8_bytes(tmp_path: Path) -> None:
    write_definition(
        tmp_path,
        [{"name": "Big", "function": BIG, "params": {"size": 3000}}],
    )
    async with SQLiteStore(tmp_path / "db") as store:
        small = WorkflowBuilder(definitions=[tmp_path], max_state_bytes=4096)
        fits = await small.start_workflow("EngineTest", store=store)
        assert fits.status == "COMPLETED"
        tight = WorkflowBuilder(definitions=[tmp_path], max_state_bytes=2048)
        wf = await tight.start_workflow("EngineTest", store=store)
        assert wf.status == "FAILED"
        assert wf.error is not None
        assert "the limit is 2 KiB (max_state_bytes)" in wf.error
        # 1000 characters of three UTF-8 bytes each are 3000 bytes, over a 2 KiB limit
        with pytest.raises(InvalidData) as caught:
            await tight.create_workflow("EngineTest", {"note": "€" * 1000}, store=store)
    as_json = EngineState(note="€" * 1000).model_dump_json()
    assert len(as_json) < 2048 < len(as_json.encode())  # over the limit in bytes, not characters
    size = f"{len(as_json.encode()) / 1024:.1f} KiB"
    assert str(caught.value).startswith(f"The initial data is {size} of JSON; the limit is 2 KiB")
    assert AgentConfig().max_state_bytes == 1024 * 1024


async def test_oversized_initial_data_is_refused_and_nothing_is_stored(tmp_path: Path) -> None:
    write_definition(tmp_path, [engine_step("Only", "record")])
    builder = WorkflowBuilder(definitions=[tmp_path])
    async with SQLiteStore(tmp_path / "db") as store:
        with pytest.raises(InvalidData) as caught:
            await builder.create_workflow("EngineTest", {"note": "x" * (1024 * 1024)}, store=store)
        assert await store.list_instances() == []
    message = str(caught.value)
    assert message.startswith("The initial data is 1.0 MiB of JSON; the limit is 1 MiB")
    assert "max_state_bytes" in message


# -- #9: unknown fields in initial data ------------------------------------------------------------


async def test_unknown_fields_in_initial_data_are_rejected_like_in_a_step_result(
    tmp_path: Path,
) -> None:
    write_definition(tmp_path, [engine_step("Only", "record")])
    builder = WorkflowBuilder(definitions=[tmp_path])
    async with SQLiteStore(tmp_path / "db") as store:
        with pytest.raises(InvalidData) as caught:
            await builder.create_workflow(
                "EngineTest", {"count": 2, "colour": "red", "amount": 1}, store=store
            )
        assert await store.list_instances() == []
    assert str(caught.value) == (
        "Initial data has field(s) ['amount', 'colour'] that EngineState does not have; "
        "add them to the state model or leave them out."
    )
    with pytest.raises(InvalidData):
        builder.validate_data("EngineTest", {"colour": "red"})  # what `start` checks first
    assert builder.validate_data("EngineTest", {"count": 2}).count == 2  # type: ignore[attr-defined]


async def test_a_state_model_allowing_extras_keeps_them(tmp_path: Path) -> None:
    module = tmp_path / "extras_models.py"
    module.write_text(
        "from pydantic import BaseModel, ConfigDict\n"
        "class Loose(BaseModel):\n"
        "    model_config = ConfigDict(extra='allow')\n"
        "    count: int = 0\n",
        encoding="utf-8",
    )
    write_definition(tmp_path, [engine_step("Only", "record")])
    text = (tmp_path / "EngineTest.yaml").read_text().replace(MODEL, "extras_models.Loose")
    (tmp_path / "EngineTest.yaml").write_text(text)
    with contextlib.ExitStack() as stack:
        stack.enter_context(pytest.MonkeyPatch.context()).syspath_prepend(str(tmp_path))
        builder = WorkflowBuilder(definitions=[tmp_path / "EngineTest.yaml"])
        state = builder.validate_data("EngineTest", {"count": 1, "colour": "red"})
    assert state.model_dump() == {"count": 1, "colour": "red"}
