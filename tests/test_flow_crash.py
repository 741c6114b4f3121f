"""Crash tests of the control-flow step types: a real agent process (tests/crash/flow_runner.py)
runs a workflow of tests/flows/crashflow, is SIGKILLed at a chosen point (a step that notes its
start in the ledger file and then waits on a file), and a fresh process recovers. The ledger the
steps fsync shows exactly what executed, before and after the kill; the journal and the outbox
show what was committed."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import WorkflowStatus
from tests.crash.flow_agent import HELD, FlowAgent, ran, rows, undone

pytestmark = pytest.mark.slow


def compensations(agent: FlowAgent) -> list[tuple[str, int, str]]:
    return [(e.step, e.attempt, e.outcome) for e in agent.journal() if e.phase == "compensate"]


# -- DECISION ------------------------------------------------------------------------------------
ROUTE_A = {"A1", "A2"}


def test_decision_route_b_that_fails_compensates_route_b_and_before_only(tmp_path: Path) -> None:
    agent = FlowAgent(tmp_path, "FlowDecision")
    agent.fail("B3")
    assert agent.finishes("start", data={"route": "b"}) == {agent.id: "FAILED_ROLLED_BACK"}
    assert agent.lines() == [
        "Prep:start",
        "Prep:done",
        "Check:start",
        "Check:route=b",
        "B1:start",
        "B1:done",
        "B2:start",
        "B2:done",
        "B3:start",
        "B3:fail",
        "undo:B2:start",
        "undo:B2:done",
        "undo:B1:start",
        "undo:B1:done",
        "undo:Prep:start",
        "undo:Prep:done",
    ]
    assert compensations(agent) == [
        ("B2", 1, "completed"),
        ("B1", 1, "completed"),
        ("Prep", 1, "completed"),
    ]
    assert agent.events("compensation_completed") == ["B2", "B1", "Prep"]
    assert not {e.step for e in agent.journal()} & ROUTE_A


def test_decision_killed_mid_route_b_recovers_and_compensates_route_b_only(
    tmp_path: Path,
) -> None:
    agent = FlowAgent(tmp_path, "FlowDecision")
    agent.hold("B2")
    agent.fail("B3")
    agent.kill_at("B2:start", data={"route": "b"})
    record = agent.record()
    assert record.status is WorkflowStatus.ACTIVE
    assert record.current_step == "B2"
    assert rows(agent.journal())[-1] == ("forward", "B2", 1, "started")

    assert agent.finishes("recover") == {agent.id: "FAILED_ROLLED_BACK"}
    lines = agent.lines()
    assert lines == [
        "Prep:start",
        "Prep:done",
        "Check:start",
        "Check:route=b",
        "B1:start",
        "B1:done",
        "B2:start",  # killed here
        "B2:start",
        "B2:done",
        "B3:start",
        "B3:fail",
        "undo:B2:start",
        "undo:B2:done",
        "undo:B1:start",
        "undo:B1:done",
        "undo:Prep:start",
        "undo:Prep:done",
    ]
    # The route chosen before the kill is the route recovered: the decision did not run again.
    assert ran(lines, "Check:start") == 1
    assert [r for r in rows(agent.journal()) if r[0] == "forward" and r[1] == "B2"] == [
        ("forward", "B2", 1, "interrupted"),
        ("forward", "B2", 2, "completed"),
    ]
    assert compensations(agent) == [
        ("B2", 1, "completed"),
        ("B1", 1, "completed"),
        ("Prep", 1, "completed"),
    ]
    assert not {e.step for e in agent.journal()} & ROUTE_A
    assert agent.record().status is WorkflowStatus.FAILED_ROLLED_BACK
    # And it stays ended.
    assert agent.finishes("recover") == {}
    assert agent.lines() == lines


def test_decision_killed_while_it_decides_decides_again_and_takes_its_route(
    tmp_path: Path,
) -> None:
    agent = FlowAgent(tmp_path, "FlowDecision")
    agent.hold("Check")
    agent.kill_at("Check:start", data={"route": "a"})
    assert agent.record().current_step == "Check"
    assert "Check:route=a" not in agent.lines()

    assert agent.finishes("recover") == {agent.id: "COMPLETED"}
    assert agent.lines() == [
        "Prep:start",
        "Prep:done",
        "Check:start",  # killed here, before it returned a route
        "Check:start",
        "Check:route=a",
        "A1:start",
        "A1:done",
        "A2:start",
        "A2:done",  # next: END — route b's steps never run
    ]
    assert agent.events("step_completed") == ["Prep", "Check", "A1", "A2"]


# -- HUMAN_INPUT ---------------------------------------------------------------------------------
def pause_and_kill(agent: FlowAgent) -> None:
    """Start FlowPause; once it is PAUSED (the runner holds), SIGKILL the process."""
    agent.kill_at(HELD, extra=("--hold",))
    assert agent.lines() == ["Prep:start", "Prep:done", HELD]
    record = agent.record()
    assert record.status is WorkflowStatus.PAUSED
    assert record.current_step == "Approve"


def test_paused_workflow_survives_sigkill_and_resumes_after_restart(tmp_path: Path) -> None:
    agent = FlowAgent(tmp_path, "FlowPause")
    pause_and_kill(agent)

    # A restart resumes what was running; a PAUSED workflow stays PAUSED and runs nothing.
    statuses = agent.finishes("recover")
    assert statuses.get(agent.id, "PAUSED") == "PAUSED"
    assert agent.record().status is WorkflowStatus.PAUSED
    assert agent.lines() == ["Prep:start", "Prep:done", HELD]

    # Invalid input: refused naming the field; the workflow stays PAUSED (also for a new process).
    refused = agent.answer("resume", data={"approved": "perhaps"})
    assert refused["error"]["code"] == "invalid_input"
    assert "approved" in refused["error"]["message"]
    assert "PAUSED" in refused["error"]["message"]
    assert "Traceback" not in refused["error"]["message"]
    record = agent.record()
    assert record.status is WorkflowStatus.PAUSED
    assert record.state["approved"] is False

    # Valid input, in yet another process: merged into the state, and the workflow goes on.
    assert agent.finishes("resume", data={"approved": True, "note": "ok"}) == {
        agent.id: "COMPLETED"
    }
    lines = agent.lines()
    assert lines == [
        "Prep:start",
        "Prep:done",
        HELD,
        "Finish:start",
        "Finish:approved=True:note=ok",
        "Finish:done",
    ]
    record = agent.record()
    assert record.status is WorkflowStatus.COMPLETED
    assert record.state["approved"] is True
    assert record.state["note"] == "ok (seen)"
    assert not undone(lines)


def test_kill_right_after_resume_was_accepted_goes_on_after_restart(tmp_path: Path) -> None:
    agent = FlowAgent(tmp_path, "FlowPause")
    pause_and_kill(agent)

    agent.dies("resume", "--kill-after-resume", data={"approved": True, "note": "yes"})
    # The resume committed before it returned: the input is in the state, the workflow ACTIVE.
    record = agent.record()
    assert record.status is WorkflowStatus.ACTIVE
    assert record.state["approved"] is True
    assert record.state["note"] == "yes"
    assert "Finish:start" not in agent.lines()

    assert agent.finishes("recover") == {agent.id: "COMPLETED"}
    lines = agent.lines()
    assert ran(lines, "Prep:start") == 1
    assert ran(lines, "Finish:start") == 1
    assert "Finish:approved=True:note=yes" in lines
    assert agent.record().state["note"] == "yes (seen)"
    # Resuming it again is refused: it is no longer PAUSED.
    again = agent.answer("resume", data={"approved": False})
    assert again["error"]["code"] == "invalid_transition"
    assert agent.record().state["approved"] is True


def test_paused_workflow_cancelled_after_a_restart_compensates_what_completed(
    tmp_path: Path,
) -> None:
    agent = FlowAgent(tmp_path, "FlowPause")
    pause_and_kill(agent)

    assert agent.finishes("cancel") == {agent.id: "CANCELLED"}
    assert agent.lines() == [
        "Prep:start",
        "Prep:done",
        HELD,
        "undo:Prep:start",
        "undo:Prep:done",
    ]
    assert compensations(agent) == [("Prep", 1, "completed")]
    assert agent.record().status is WorkflowStatus.CANCELLED


# -- PARALLEL ------------------------------------------------------------------------------------
PARALLEL_STEPS = ["Prep", "L1", "L2", "R1", "R2", "After"]


def test_parallel_killed_with_both_branches_in_flight_resumes_both(tmp_path: Path) -> None:
    agent = FlowAgent(tmp_path, "FlowParallel")
    agent.hold("L1")
    agent.hold("R1")
    agent.kill_at("L1:start", "R1:start")
    before = agent.lines()
    started = {(e.step, e.outcome) for e in agent.journal()}
    assert {("L1", "started"), ("R1", "started")} <= started
    assert agent.record().status is WorkflowStatus.ACTIVE

    assert agent.finishes("recover") == {agent.id: "COMPLETED"}
    lines = agent.lines()
    assert lines[: len(before)] == before
    # The interrupted attempts ran once more; nothing else ran twice.
    assert {s: ran(lines, f"{s}:start") for s in PARALLEL_STEPS} == {
        "Prep": 1,
        "L1": 2,
        "L2": 1,
        "R1": 2,
        "R2": 1,
        "After": 1,
    }
    assert all(ran(lines, f"{s}:done") == 1 for s in PARALLEL_STEPS)
    # Each branch went on from its own position: L2 after L1, R2 after R1, After last.
    after_kill = lines[len(before) :]
    assert after_kill.index("L2:start") > after_kill.index("L1:done")
    assert after_kill.index("R2:start") > after_kill.index("R1:done")
    assert after_kill[-2:] == ["After:start", "After:done"]
    interrupted = [(e.step, e.attempt) for e in agent.journal() if e.outcome == "interrupted"]
    assert sorted(interrupted) == [("L1", 1), ("R1", 1)]
    assert not undone(lines)


def test_parallel_of_threads_killed_with_both_in_flight_resumes_both(tmp_path: Path) -> None:
    agent = FlowAgent(tmp_path, "FlowParallelSync")
    agent.hold("L1")
    agent.hold("R1")
    agent.kill_at("L1:start", "R1:start")  # both worker threads inside their step

    assert agent.finishes("recover") == {agent.id: "COMPLETED"}
    lines = agent.lines()
    assert {s: ran(lines, f"{s}:start") for s in ("L1", "R1", "After")} == {
        "L1": 2,
        "R1": 2,
        "After": 1,
    }
    assert lines[-2:] == ["After:start", "After:done"]
    interrupted = [(e.step, e.attempt) for e in agent.journal() if e.outcome == "interrupted"]
    assert sorted(interrupted) == [("L1", 1), ("R1", 1)]
    assert not undone(lines)


def test_parallel_of_threads_with_a_failing_branch_waits_for_the_other_and_undoes_it(
    tmp_path: Path,
) -> None:
    agent = FlowAgent(tmp_path, "FlowParallelSync")
    # L1 runs on its thread until R1 has failed: a thread cannot be stopped, so its result is
    # waited for, recorded, and undone with the rollback.
    agent.after("L1", "R1:fail")
    agent.fail("R1")
    assert agent.finishes("start") == {agent.id: "FAILED_ROLLED_BACK"}
    lines = agent.lines()
    assert lines.index("L1:done") > lines.index("R1:fail")
    assert undone(lines) == ["L1"]
    assert "After:start" not in lines
    assert ("L1", 1, "completed") in [(s, a, o) for p, s, a, o in rows(agent.journal())]


def test_parallel_killed_with_one_branch_done_resumes_the_other_only(tmp_path: Path) -> None:
    agent = FlowAgent(tmp_path, "FlowParallel")
    agent.hold("L2")
    # Killed once L2 is in flight and R2's completion is committed (read from the journal).
    agent.kill_when(
        lambda: "L2:start" in agent.lines() and agent.completed_in_journal("R2"), "start"
    )
    assert agent.record().status is WorkflowStatus.ACTIVE

    assert agent.finishes("recover") == {agent.id: "COMPLETED"}
    lines = agent.lines()
    assert {s: ran(lines, f"{s}:start") for s in PARALLEL_STEPS} == {
        "Prep": 1,
        "L1": 1,
        "L2": 2,
        "R1": 1,
        "R2": 1,
        "After": 1,
    }
    assert lines[-2:] == ["After:start", "After:done"]
    forward_rows = [(s, a, o) for p, s, a, o in rows(agent.journal()) if p == "forward"]
    assert ("L2", 1, "interrupted") in forward_rows
    assert ("L2", 2, "completed") in forward_rows
    assert [r for r in forward_rows if r[0] == "R2"] == [("R2", 1, "completed")]
    assert agent.record().status is WorkflowStatus.COMPLETED


def test_parallel_killed_while_a_branch_waits_to_retry_retries_it_after_a_restart(
    tmp_path: Path,
) -> None:
    agent = FlowAgent(tmp_path, "FlowParallelRetry")
    agent.hold("L1")
    agent.fail_once("R1")
    # Killed with L1 in flight and R1's first failure committed (its back-off running).
    agent.kill_when(
        lambda: "L1:start" in agent.lines() and agent.ended_in_journal("R1", "failed"), "start"
    )
    assert agent.record().status is WorkflowStatus.ACTIVE

    assert agent.finishes("recover") == {agent.id: "COMPLETED"}
    lines = agent.lines()
    assert ran(lines, "L1:start") == 2  # interrupted, then again
    assert ran(lines, "R1:start") == 2  # failed (before the kill), then its retry
    assert ran(lines, "R1:fail") == 1
    assert lines[-2:] == ["After:start", "After:done"]
    branch_rows = [(s, a, o) for p, s, a, o in rows(agent.journal()) if s in ("L1", "R1")]
    assert sorted(branch_rows) == [
        ("L1", 1, "interrupted"),
        ("L1", 2, "completed"),
        ("R1", 1, "failed"),
        ("R1", 2, "completed"),
    ]
    assert not undone(lines)


def test_parallel_failing_branch_compensates_both_branches_newest_first(tmp_path: Path) -> None:
    agent = FlowAgent(tmp_path, "FlowParallel")
    # Completions in a known order across the branches: L1, R1, L2; then R2 fails.
    agent.after("R1", "L1:done")
    agent.after("L2", "R1:done")
    agent.after("R2", "L2:done")
    agent.fail("R2")
    assert agent.finishes("start") == {agent.id: "FAILED_ROLLED_BACK"}
    lines = agent.lines()
    assert [line for line in lines if line.endswith(":done") and not line.startswith("undo:")] == [
        "Prep:done",
        "L1:done",
        "R1:done",
        "L2:done",
    ]
    assert "R2:fail" in lines
    assert "After:start" not in lines
    # Every completed step of both branches, newest first, then the step before the PARALLEL.
    assert undone(lines) == ["L2", "R1", "L1", "Prep"]
    assert agent.events("step_completed")[:4] == ["Prep", "L1", "R1", "L2"]
    assert agent.events("compensation_completed") == ["L2", "R1", "L1", "Prep"]
    assert "undo:R2:start" not in lines  # it failed: it never completed
    assert agent.record().status is WorkflowStatus.FAILED_ROLLED_BACK


def test_parallel_killed_in_its_rollback_finishes_it_after_a_restart(tmp_path: Path) -> None:
    agent = FlowAgent(tmp_path, "FlowParallel")
    agent.after("R1", "L1:done")
    agent.after("L2", "R1:done")
    agent.after("R2", "L2:done")
    agent.fail("R2")
    agent.hold_undo("R1")
    agent.kill_at("undo:R1:start")
    assert agent.record().status is WorkflowStatus.COMPENSATING
    assert undone(agent.lines()) == ["L2"]

    assert agent.finishes("recover") == {agent.id: "FAILED_ROLLED_BACK"}
    lines = agent.lines()
    assert undone(lines) == ["L2", "R1", "L1", "Prep"]
    assert ran(lines, "undo:R1:start") == 2  # the interrupted compensation, once more
    assert ran(lines, "undo:L2:start") == 1
    assert all(ran(lines, f"{s}:start") == 1 for s in ["Prep", "L1", "L2", "R1", "R2"])
    assert "After:start" not in lines
    assert compensations(agent) == [
        ("L2", 1, "completed"),
        ("R1", 1, "interrupted"),
        ("R1", 2, "completed"),
        ("L1", 1, "completed"),
        ("Prep", 1, "completed"),
    ]


# -- pivot ---------------------------------------------------------------------------------------
def test_failure_after_the_pivot_fails_with_an_alert_compensates_nothing_and_retries(
    tmp_path: Path,
) -> None:
    agent = FlowAgent(tmp_path, "FlowPivot")
    agent.hold("Ship")
    agent.fail("Ship")
    agent.kill_at("Ship:start")  # killed inside the step after the pivot
    assert agent.record().current_step == "Ship"

    # Recovered: the interrupted attempt does not count; both attempts then fail.
    assert agent.finishes("recover") == {agent.id: "FAILED"}
    lines = agent.lines()
    assert ran(lines, "Reserve:start") == 1
    assert ran(lines, "Charge:start") == 1
    assert ran(lines, "Ship:start") == 3
    assert ran(lines, "Ship:fail") == 2
    assert not undone(lines)
    assert not any(line.startswith("undo:") for line in lines)
    assert compensations(agent) == []
    record = agent.record()
    assert record.status is WorkflowStatus.FAILED
    mine = [a for a in agent.alerts() if a.get("workflow_id") == agent.id]
    assert mine, agent.outbox()
    assert any("Charge" in a["message"] and "Ship" in a["message"] for a in mine), mine

    # Fixed, then retried in a new process: it resumes from the failed step, nothing before reruns.
    agent.fail("Ship", on=False)
    assert agent.finishes("retry") == {agent.id: "COMPLETED"}
    lines = agent.lines()
    assert ran(lines, "Reserve:start") == 1
    assert ran(lines, "Charge:start") == 1
    assert ran(lines, "Ship:start") == 4
    assert lines[-2:] == ["Ship:start", "Ship:done"]
    assert not undone(lines)
    assert agent.record().status is WorkflowStatus.COMPLETED


def test_failure_at_the_pivot_rolls_back_as_usual(tmp_path: Path) -> None:
    agent = FlowAgent(tmp_path, "FlowPivot")
    agent.fail("Charge")
    assert agent.finishes("start") == {agent.id: "FAILED_ROLLED_BACK"}
    assert agent.lines() == [
        "Reserve:start",
        "Reserve:done",
        "Charge:start",
        "Charge:fail",
        "undo:Reserve:start",
        "undo:Reserve:done",
    ]
    assert not [a for a in agent.alerts() if a.get("workflow_id") == agent.id]
