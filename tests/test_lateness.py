"""``max_lateness`` (DESIGN §11) on a real SQLite file with an injected clock: a step due too long
after the step before it finished (an outage) fails unrun with ``DeadlineMissed`` and saga rules
apply; the time is measured by the clock rules, and an unknowable one counts as late."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from _engine_fixtures import ROOT  # noqa: F401  (puts the repository on sys.path)

from agent import SQLiteStore, WorkflowBuilder, WorkflowStatus
from agent._clock import FakeClock

S = WorkflowStatus
STEPS = "tests.flows.core.steps"
MODEL = "tests.flows.core.models.FlowState"


def write(tmp_path: Path, *, lateness: float | None = 900, steps: list[Any] | None = None) -> Path:
    valve: dict[str, Any] = {
        "name": "Open_Valve",
        "function": f"{STEPS}.do",
        "compensate_function": f"{STEPS}.undo",
    }
    if lateness is not None:
        valve["max_lateness"] = lateness
    check = {
        "name": "Check_Soil",
        "function": f"{STEPS}.do",
        "compensate_function": f"{STEPS}.undo",
    }
    body = {
        "workflow_type": "Late",
        "workflow_version": "1.0.0",
        "initial_state_model": MODEL,
        "saga_mode": True,
        "steps": steps or [check, valve],
    }
    path = tmp_path / "late.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
    return path


async def first_step_then_restart(
    tmp_path: Path, store: SQLiteStore, clock: FakeClock, **kw: Any
) -> tuple[str, Path]:
    path = write(tmp_path, **kw)
    builder = WorkflowBuilder([path], clock=clock)
    wf = await builder.create_workflow("Late", {}, store=store)
    await wf.next_step()  # Check_Soil completes; then the power goes
    assert wf.progress.completed == ("Check_Soil",)
    return wf.id, path


async def drive_after(path: Path, store: SQLiteStore, clock: FakeClock, wid: str) -> Any:
    builder = WorkflowBuilder([path], clock=clock)  # a new agent run
    wf = await builder.load_workflow(wid, store)
    await wf.run()
    return wf


async def test_a_step_due_beyond_its_max_lateness_fails_unrun_and_rolls_back(
    tmp_path: Path, store: SQLiteStore
) -> None:
    clock = FakeClock()
    wid, path = await first_step_then_restart(tmp_path, store, clock)
    clock.advance(1834)
    wf = await drive_after(path, store, clock, wid)
    assert wf.status is S.FAILED_ROLLED_BACK
    assert wf.error == (
        "Step 'Open_Valve' started 1834 s after 'Check_Soil' finished, beyond its "
        "max_lateness of 900 s; it did not run."
    )
    assert wf.state.ledger == ["Check_Soil", "undo:Check_Soil"]  # Open_Valve never ran
    assert wf.progress.compensated == ("Check_Soil",)
    journal = await store.journal(wid)
    assert [r.step for r in journal if r.phase == "forward"] == ["Check_Soil"]  # never began


async def test_within_its_max_lateness_it_runs_even_after_a_wall_jump(
    tmp_path: Path, store: SQLiteStore
) -> None:
    clock = FakeClock()
    wid, path = await first_step_then_restart(tmp_path, store, clock)
    clock.advance(600)
    clock.jump_wall(86_400)  # same boot: the boot-time clock measures
    wf = await drive_after(path, store, clock, wid)
    assert wf.status is S.COMPLETED
    assert wf.progress.completed == ("Check_Soil", "Open_Valve")


@pytest.mark.parametrize(
    ("before", "after", "wall_gap", "status"),
    [
        (True, True, 100.0, S.COMPLETED),  # across a reboot the wall clock measures
        (True, True, 2000.0, S.FAILED_ROLLED_BACK),
        (True, False, 100.0, S.FAILED_ROLLED_BACK),  # unknown: late, by safety
        (False, True, 100.0, S.FAILED_ROLLED_BACK),
    ],
)
async def test_across_a_reboot_the_wall_clock_measures_only_when_synchronized_at_both_ends(
    tmp_path: Path,
    store: SQLiteStore,
    before: bool,
    after: bool,
    wall_gap: float,
    status: WorkflowStatus,
) -> None:
    clock = FakeClock(synchronized=before)
    wid, path = await first_step_then_restart(tmp_path, store, clock)
    clock.reboot(wall=clock.wall() + wall_gap, synchronized=after)
    wf = await drive_after(path, store, clock, wid)
    assert wf.status is status
    if status is not S.COMPLETED and not (before and after):
        assert wf.error is not None
        assert "the time since 'Check_Soil' finished is unknown" in wf.error


async def test_without_max_lateness_the_progress_carries_no_stamp(
    tmp_path: Path, store: SQLiteStore
) -> None:
    clock = FakeClock()
    wid, path = await first_step_then_restart(tmp_path, store, clock, lateness=None)
    rec = await store.load_instance(wid)
    assert rec is not None
    assert "done_at" not in rec.progress
    clock.advance(10_000)
    wf = await drive_after(path, store, clock, wid)
    assert wf.status is S.COMPLETED
