"""A DELAY in a PARALLEL's branch, and a branch step's retry back-off, as durable timers (DESIGN
§10, §11): the state machine's rules with a FakeClock, then the engine on a real SQLite file with
the timer service (parked while only timers wait, rebased at a restart, never early, ``on_late``,
cancel). The SIGKILL of a real agent is in tests/test_branch_delay_agent.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from _engine_fixtures import ROOT  # noqa: F401  (puts the repository on sys.path)
from _timer_agent import Agent, recover

from agent import SQLiteStore, WorkflowBuilder, WorkflowStatus
from agent import _saga as saga
from agent._clock import Due, FakeClock, Late, TimerMark, Wait, arm, decide, read_clock, rebase

S = WorkflowStatus
STEPS = "tests.flows.core.steps"
MODEL = "tests.flows.core.models.FlowState"
DAY = 86_400.0


# ------------------------------------------------------------------------------------------------
# The state machine


def plan(*, on_late: str = "run", retry: tuple[float, ...] = ()) -> saga.Plan:
    """Before -> P [[A, Soak (DELAY)], [B]] -> After."""
    return saga.Plan(
        (
            saga.StepPlan("Before", compensable=True),
            saga.StepPlan("P", kind="PARALLEL", branches=(("A", "Soak"), ("B",))),
            saga.StepPlan("After", compensable=True),
        ),
        (
            saga.StepPlan("A", compensable=True),
            saga.StepPlan("Soak", kind="DELAY", on_late=on_late),  # type: ignore[arg-type]
            saga.StepPlan("B", compensable=True, max_attempts=3, retry_delays=retry),
        ),
    )


def at_parallel(p: saga.Plan, *, saga_mode: bool = True) -> saga.Progress:
    progress = saga.start(p, saga=saga_mode).progress
    progress = saga.begin(progress, "Before", "forward").progress
    return saga.succeeded(p, progress).progress


def run_branch(p: saga.Plan, progress: saga.Progress, step: str) -> saga.Progress:
    progress = saga.branch_begin(p, progress, step).progress
    return saga.branch_succeeded(p, progress, step).progress


def soaking(p: saga.Plan, clock: FakeClock, *, b_done: bool = True) -> saga.Progress:
    """A has run and Soak's 10 s timer is armed (B has run too, unless told)."""
    progress = run_branch(p, at_parallel(p), "A")
    if b_done:
        progress = run_branch(p, progress, "B")
    assert saga.Delay("Soak") in saga.branch_actions(p, progress)
    change = saga.branch_delay_armed(p, progress, "Soak", arm(read_clock(clock), 10))
    assert change.events == (saga.Event("step_started", "Soak"),)
    return change.progress


def test_a_branch_delay_is_a_delay_position_and_the_others_go_on_meanwhile() -> None:
    p = plan()
    progress = run_branch(p, at_parallel(p), "A")
    assert saga.branch_actions(p, progress) == (saga.Delay("Soak"), saga.Run("B", "forward"))
    clock = FakeClock()
    progress = saga.branch_delay_armed(p, progress, "Soak", arm(read_clock(clock), 10)).progress
    assert not saga.branch_waiting(p, progress)  # B can still run
    progress = run_branch(p, progress, "B")
    assert progress.next_step == "P"
    assert saga.branch_waiting(p, progress)  # only the timer is left
    with pytest.raises(ValueError, match="armed already"):
        saga.branch_delay_armed(p, progress, "Soak", arm(read_clock(clock), 10))


def test_the_parallel_completes_when_its_delay_does_and_a_rollback_skips_the_delay() -> None:
    p = plan()
    progress = soaking(p, FakeClock())
    change = saga.branch_delay_finished(p, progress, "Soak")
    after = change.progress
    assert [e.name for e in change.events] == ["step_completed", "step_completed"]
    assert after.completed == ("Before", "A", "B", "Soak", "P")
    assert after.next_step == "After"
    assert after.waits == {}
    after = saga.begin(after, "After", "forward").progress
    failed = saga.failed(p, after, "boom").progress
    assert failed.to_compensate == ("B", "A", "Before")  # no DELAY: it has nothing to undo


def test_a_branch_delay_cannot_finish_unarmed_or_out_of_turn() -> None:
    p = plan()
    progress = run_branch(p, at_parallel(p), "B")
    with pytest.raises(ValueError, match="not a DELAY that is due"):
        saga.branch_delay_finished(p, progress, "Soak")  # A has not run yet
    progress = run_branch(p, progress, "A")
    with pytest.raises(ValueError, match="not armed"):
        saga.branch_delay_finished(p, progress, "Soak")


@pytest.mark.parametrize(("on_late", "status"), [("run", S.ACTIVE), ("fail", S.COMPENSATING)])
def test_a_late_branch_delay_goes_on_or_fails_the_parallel_by_its_on_late(
    on_late: str, status: WorkflowStatus
) -> None:
    p = plan(on_late=on_late)
    progress = soaking(p, FakeClock())
    after = saga.branch_delay_finished(p, progress, "Soak", late_by=1834).progress
    assert after.status is status
    assert after.waits == {}
    if on_late == "fail":
        assert after.failed_step == "P"  # `retry` resumes the PARALLEL
        assert after.error is not None
        assert "DELAY step 'Soak' ended 1834 s late" in after.error
        assert after.to_compensate == ("B", "A", "Before")


def test_a_late_fail_while_another_branch_runs_waits_for_it_then_rolls_back() -> None:
    p = plan(on_late="fail")
    progress = soaking(p, FakeClock(), b_done=False)
    progress = saga.branch_begin(p, progress, "B").progress
    halted = saga.branch_delay_finished(p, progress, "Soak", late_by=5).progress
    assert halted.status is S.ACTIVE  # B is still in flight
    assert saga.branch_actions(p, halted) == ()
    done = saga.branch_succeeded(p, halted, "B").progress
    assert done.status is S.COMPENSATING
    assert done.to_compensate == ("B", "A", "Before")


@pytest.mark.parametrize("saga_mode", [True, False])
def test_a_cancel_while_only_a_branch_delay_waits_compensates_the_completed_steps(
    saga_mode: bool,
) -> None:
    p = plan()
    progress = run_branch(p, at_parallel(p, saga_mode=saga_mode), "A")
    progress = run_branch(p, progress, "B")
    progress = saga.branch_delay_armed(
        p, progress, "Soak", arm(read_clock(FakeClock()), 10)
    ).progress
    after = saga.cancel(p, progress).progress
    assert after.waits == {}
    if saga_mode:
        assert after.status is S.COMPENSATING
        assert after.to_compensate == ("B", "A", "Before")
    else:
        assert after.status is S.CANCELLED


def test_a_cancel_while_a_branch_runs_and_the_delay_waits_stops_both() -> None:
    p = plan()
    progress = soaking(p, FakeClock(), b_done=False)
    progress = saga.branch_begin(p, progress, "B").progress
    marked = saga.cancel(p, progress).progress
    assert marked.status is S.ACTIVE
    assert marked.cancelled
    assert marked.waits == {}
    assert saga.branch_actions(p, marked) == ()
    after = saga.branch_cancelled(p, marked, "B", "cancelled on request").progress
    assert after.status is S.COMPENSATING
    assert after.to_compensate == ("B", "A", "Before")  # B may have taken effect: first


def test_the_branch_timer_never_fires_early_across_a_restart_and_a_wall_jump() -> None:
    clock = FakeClock()
    progress = soaking(plan(), clock)
    clock.advance(4)
    clock.jump_wall(DAY)  # the agent restarts a day later by the wall clock
    mark = rebase(progress.waits["Soak"], read_clock(clock))
    progress = saga.branch_timer_rebased(progress, "Soak", mark).progress
    assert decide(progress.waits["Soak"], read_clock(clock)) == Wait(6)
    clock.advance(6)
    assert decide(progress.waits["Soak"], read_clock(clock)) == Due()


def test_a_branch_timer_whose_deadline_passed_while_the_agent_was_down_is_late() -> None:
    clock = FakeClock()
    progress = soaking(plan(), clock)
    clock.advance(30)  # down meanwhile
    mark = rebase(progress.waits["Soak"], read_clock(clock))
    assert decide(mark, read_clock(clock)) == Late(20)
    with pytest.raises(ValueError, match="No timer"):
        saga.branch_timer_rebased(progress, "B", mark)


def test_a_branch_back_off_is_a_durable_timer_armed_at_the_failure() -> None:
    p = plan(retry=(5.0,))
    clock = FakeClock()
    progress = saga.branch_begin(p, at_parallel(p), "B").progress
    reading = read_clock(clock)
    after = saga.branch_failed(p, progress, "B", "boom", now=reading.wall, clock=reading).progress
    assert after.waits == {"B": arm(reading, 5.0)}
    assert saga.Run("B", "forward") in saga.branch_actions(p, after)
    after = run_branch(p, after, "A")
    after = saga.branch_delay_armed(p, after, "Soak", arm(reading, 10)).progress
    assert saga.branch_waiting(p, after)  # B's back-off and Soak: only timers wait
    again = saga.branch_begin(p, after, "B").progress
    assert set(again.waits) == {"Soak"}  # beginning B spends its back-off
    clock.advance(2)
    clock.jump_wall(DAY)  # a restart with the wall a day ahead retries no earlier
    mark = rebase(after.waits["B"], read_clock(clock))
    assert decide(mark, read_clock(clock)) == Wait(3)


def test_waits_survive_the_json_and_a_standard_only_progress_has_none() -> None:
    p = plan(retry=(5.0,))
    clock = FakeClock()
    progress = soaking(p, clock, b_done=False)
    text = json.dumps(progress.to_json())
    assert saga.Progress.from_json(json.loads(text)) == progress
    assert "waits" not in saga.Progress().to_json()


def test_a_stored_waits_float_of_the_previous_version_loads_with_its_wall_rule() -> None:
    stored = {"status": "ACTIVE", "next_step": "P", "completed": ["Before"], "waits": {"B": 1000.0}}
    progress = saga.Progress.from_json(stored)
    mark = progress.waits["B"]
    assert isinstance(mark, TimerMark)
    assert mark.wall_deadline == 1000.0
    clock = FakeClock(wall=990.0, synchronized=True)
    rebased = rebase(mark, read_clock(clock))
    assert decide(rebased, read_clock(clock)) == Wait(10)  # the wall time it stored, no earlier
    clock.advance(10)
    assert decide(rebased, read_clock(clock)) == Due()
    assert saga.Progress.from_json(progress.to_json()) == progress


# ------------------------------------------------------------------------------------------------
# The engine, on a real SQLite file, with a fake clock and the timer service


def st(name: str, **more: Any) -> dict[str, Any]:
    return {"name": name, "function": f"{STEPS}.do", "compensate_function": f"{STEPS}.undo", **more}


def write(
    tmp_path: Path,
    delay: dict[str, Any],
    *,
    saga_mode: bool = True,
    other: list[dict[str, Any]] | None = None,
) -> Path:
    """Before -> P [[A, Soak (DELAY)], other or [B1, B2]] -> After."""
    path = tmp_path / "flow.yaml"
    body = {
        "workflow_type": "BranchSoak",
        "workflow_version": "1.0.0",
        "initial_state_model": MODEL,
        "saga_mode": saga_mode,
        "steps": [
            st("Before"),
            {
                "name": "P",
                "type": "PARALLEL",
                "branches": [
                    [st("A"), {"name": "Soak", "type": "DELAY", **delay}],
                    other if other is not None else [st("B1"), st("B2")],
                ],
            },
            st("After"),
        ],
    }
    path.write_text(yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
    return path


async def stored(store: SQLiteStore, wid: str) -> saga.Progress:
    rec = await store.load_instance(wid)
    assert rec is not None
    return saga.Progress.from_json(rec.progress)


async def start_soaking(
    tmp_path: Path, store: SQLiteStore, clock: FakeClock, delay: dict[str, Any], **kw: Any
) -> tuple[Agent, str]:
    agent = await Agent(write(tmp_path, delay, **kw), clock).start(store)
    wf = await agent.builder.create_workflow("BranchSoak", {}, store=store)
    assert await wf.run() is S.ACTIVE
    return agent, wf.id


async def test_the_other_branch_runs_to_its_end_while_the_delay_waits_then_it_parks(
    tmp_path: Path, store: SQLiteStore
) -> None:
    clock = FakeClock()
    agent, wid = await start_soaking(tmp_path, store, clock, {"duration": 3})
    progress = await stored(store, wid)
    assert progress.next_step == "P"
    assert set(progress.completed) == {"Before", "A", "B1", "B2"}
    assert progress.waits["Soak"] == arm(read_clock(clock), 3)
    assert progress.running == ()
    # Parked with the timer service, as an outer DELAY: no task holds it.
    assert agent.timers.count() == 1
    wait = agent.timers.waits(wid)
    assert wait is not None
    assert 2.5 < wait <= 3.0
    wf = await agent.builder.load_workflow(wid, store)
    assert wf.in_delay
    clock.advance(2.9)
    assert await wf.run() is S.ACTIVE  # not yet: parked again with what is left
    assert "After" not in wf.state.ledger
    clock.advance(0.1)
    assert await wf.run() is S.COMPLETED
    assert wf.state.ledger[-1] == "After"
    assert wf.progress.completed[-3:] == ("Soak", "P", "After")
    assert agent.timers.count() == 0
    await agent.stop()


@pytest.mark.parametrize("wall_jump", [0.0, DAY, -DAY])
async def test_a_restart_during_a_branch_delay_waits_what_is_left_never_from_zero(
    tmp_path: Path, store: SQLiteStore, wall_jump: float
) -> None:
    clock = FakeClock()
    first, wid = await start_soaking(tmp_path, store, clock, {"duration": 3})
    await first.stop()  # the agent dies at 1 s; the wall clock jumps in between
    clock.advance(1.0)
    clock.jump_wall(wall_jump)
    second = await Agent(write(tmp_path, {"duration": 3}), clock).start(store)
    assert await recover(second, store) == []  # parked, not handed to the runner
    wait = second.timers.waits(wid)
    assert wait is not None
    assert wait == pytest.approx(2.0, abs=0.1)  # 2 s left of 3: not the full 3 s again, not 1 s
    assert (await stored(store, wid)).waits["Soak"].since == clock.boottime()  # rebased
    wf = await second.builder.load_workflow(wid, store)
    clock.advance(1.9)
    assert await wf.run() is S.ACTIVE  # never early
    clock.advance(0.1)
    assert await wf.run() is S.COMPLETED
    assert wf.state.ledger.count("B1") == 1  # nothing ran twice
    await second.stop()


@pytest.mark.parametrize(
    ("on_late", "status"), [("run", S.COMPLETED), ("fail", S.FAILED_ROLLED_BACK)]
)
async def test_after_a_reboot_long_past_the_branch_delay_on_late_decides(
    tmp_path: Path, store: SQLiteStore, on_late: str, status: WorkflowStatus
) -> None:
    clock = FakeClock()
    delay = {"duration": 3, "on_late": on_late}
    first, wid = await start_soaking(tmp_path, store, clock, delay)
    await first.stop()
    clock.reboot(wall=clock.wall() + DAY, synchronized=True)
    second = await Agent(write(tmp_path, delay), clock).start(store)
    handed = await recover(second, store)
    assert [wf.id for wf in handed] == [wid]  # due (late) at once: driven, not parked
    wf = handed[0]
    assert await wf.run() is status
    if on_late == "fail":
        assert wf.progress.compensated == ("B2", "B1", "A", "Before")
        assert wf.error is not None
        assert "on_late is fail" in wf.error
    await second.stop()


@pytest.mark.parametrize("saga_mode", [True, False])
async def test_a_cancel_while_the_branch_delay_waits_compensates_the_completed_steps(
    tmp_path: Path, store: SQLiteStore, saga_mode: bool
) -> None:
    clock = FakeClock()
    agent, wid = await start_soaking(tmp_path, store, clock, {"duration": 60}, saga_mode=saga_mode)
    wf = await agent.builder.load_workflow(wid, store)
    assert await wf.cancel() is S.CANCELLED
    assert wf.progress.waits == {}
    assert wf.progress.compensated == (("B2", "B1", "A", "Before") if saga_mode else ())
    assert agent.timers.count() == 0
    await agent.stop()


async def test_a_branch_until_before_the_sync_waits_on_the_sync(
    tmp_path: Path, store: SQLiteStore
) -> None:
    clock = FakeClock(wall=1_800_000_000.0, synchronized=False)  # 2027-01-15T08:00:00Z
    agent, wid = await start_soaking(tmp_path, store, clock, {"until": "09:00", "timezone": "UTC"})
    assert (await stored(store, wid)).waits == {}  # no wall time to arm it on yet
    assert agent.timers.count_waiting_on_sync() == 1
    clock.set(synchronized=True)
    wf = await agent.builder.load_workflow(wid, store)
    assert await wf.run() is S.ACTIVE
    assert (await stored(store, wid)).waits["Soak"].wall_deadline == 1_800_003_600.0
    assert agent.timers.count_waiting_on_sync() == 0
    clock.advance(3600)
    assert await wf.run() is S.COMPLETED
    await agent.stop()


async def test_a_branch_back_off_survives_a_restart_and_a_wall_jump_without_retrying_early(
    tmp_path: Path, store: SQLiteStore
) -> None:
    clock = FakeClock()
    failing = [
        {
            "name": "X",
            "function": f"{STEPS}.fail",
            "retry": {"max_attempts": 2, "initial_delay": 5},
        }
    ]
    first, wid = await start_soaking(tmp_path, store, clock, {"duration": 1}, other=failing)
    progress = await stored(store, wid)
    assert progress.failures == {"f:X": 1}
    assert isinstance(progress.waits["X"], TimerMark)
    assert progress.waits["X"].remaining == 5
    await first.stop()
    clock.advance(2.0)
    clock.jump_wall(DAY)  # a wall-clock back-off would be long due now
    second = await Agent(write(tmp_path, {"duration": 1}, other=failing), clock).start(store)
    handed = await recover(second, store)
    assert [wf.id for wf in handed] == [wid]  # Soak is late: it goes on, X still waits
    wf = handed[0]
    assert await wf.run() is S.ACTIVE
    assert wf.progress.failures == {"f:X": 1}  # not retried early
    assert "Soak" in wf.progress.completed
    wait = second.timers.waits(wid)
    assert wait is not None
    assert 2.9 < wait <= 3.0
    clock.advance(3.0)
    assert await wf.run() is S.FAILED_ROLLED_BACK  # its second attempt fails too
    assert wf.progress.compensated == ("A", "Before")
    await second.stop()


async def test_without_a_timer_service_a_branch_delay_waits_in_process(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "cli.db") as db:
        builder = WorkflowBuilder([write(tmp_path, {"duration": 0.05})])
        wf = await builder.start_workflow("BranchSoak", {}, store=db)
        assert wf.status is S.COMPLETED
        assert wf.progress.completed[-3:] == ("Soak", "P", "After")


# ------------------------------------------------------------------------------------------------
# Load-time rules


def test_a_branch_delay_loads_and_a_delay_needs_no_undo_before_the_pivot(tmp_path: Path) -> None:
    from agent import load_definition

    path = write(tmp_path, {"duration": 1, "on_late": "fail"})
    body = yaml.safe_load(path.read_text())
    body["steps"][2]["pivot"] = True  # After: everything before it must be undoable
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    loaded = load_definition(path)
    assert loaded.step("Soak").spec.type == "DELAY"


def test_a_branch_delay_takes_no_max_lateness(tmp_path: Path) -> None:
    from agent import DefinitionError, load_definition

    path = write(tmp_path, {"duration": 1, "max_lateness": 5})
    with pytest.raises(DefinitionError, match="runs in list order and takes no 'max_lateness'"):
        load_definition(path)
