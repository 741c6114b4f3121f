"""The control-flow transitions of the state machine (agent._saga), one rule at a time: routes
and END, DECISION keys, PAUSED and its timeout, PARALLEL branches and the halt, the pivot."""

from __future__ import annotations

import json

import pytest

from agent import WorkflowStatus
from agent import _saga as saga
from agent._saga import Plan, Progress, StepPlan

S = WorkflowStatus


def rt(p: Progress) -> Progress:
    return Progress.from_json(json.loads(json.dumps(p.to_json())))


def run_ok(plan: Plan, p: Progress) -> Progress:
    action = saga.next_action(p, plan)
    assert isinstance(action, saga.Run)
    p = saga.begin(p, action.step, "forward").progress
    return rt(saga.succeeded(plan, p).progress)


def decide(plan: Plan, p: Progress, key: str | None) -> saga.Change:
    action = saga.next_action(p, plan)
    assert isinstance(action, saga.Run)
    return saga.decided(plan, saga.begin(p, action.step, "forward").progress, key)


def test_next_and_end_override_the_list_order() -> None:
    plan = Plan((StepPlan("A", next="C"), StepPlan("B"), StepPlan("C", next="END"), StepPlan("D")))
    assert plan.after("A") == "C"
    assert plan.after("B") == "C"
    assert plan.after("C") is None
    p = run_ok(plan, saga.start(plan, saga=False).progress)
    assert p.next_step == "C"
    p = run_ok(plan, p)
    assert p.status is S.COMPLETED
    assert p.completed == ("A", "C")


ROUTES = (("x", "X"), ("y", "END"))


def decision_plan(default: str | None = None) -> Plan:
    return Plan(
        (
            StepPlan("A", compensable=True),
            StepPlan("D", kind="DECISION", routes=ROUTES, default=default),
            StepPlan("X", compensable=True),
        )
    )


def test_decision_takes_the_route_and_journals_it() -> None:
    plan = decision_plan()
    p = run_ok(plan, saga.start(plan, saga=True).progress)
    change = decide(plan, p, "x")
    assert change.progress.next_step == "X"
    assert change.progress.routes == {"D": "x"}
    assert rt(change.progress).routes == {"D": "x"}
    assert [e.name for e in change.events] == ["step_completed"]


def test_decision_end_completes() -> None:
    plan = decision_plan()
    p = run_ok(plan, saga.start(plan, saga=True).progress)
    change = decide(plan, p, "y")
    assert change.progress.status is S.COMPLETED
    assert change.progress.completed == ("A", "D")


def test_decision_unknown_key_fails_and_rolls_back_unless_a_default() -> None:
    plan = decision_plan()
    p = run_ok(plan, saga.start(plan, saga=True).progress)
    change = decide(plan, p, "q")
    assert change.progress.status is S.COMPENSATING
    assert change.progress.to_compensate == ("A",)
    assert "'q', which is none of its routes (x, y)" in (change.progress.error or "")
    with_default = decision_plan(default="X")
    p = run_ok(with_default, saga.start(with_default, saga=True).progress)
    assert decide(with_default, p, "q").progress.next_step == "X"
    assert decide(with_default, p, None).progress.next_step == "X"


def pause_plan(on_timeout: str = "fail") -> Plan:
    return Plan(
        (
            StepPlan("A", compensable=True),
            StepPlan("H", kind="HUMAN_INPUT", on_timeout=on_timeout),  # type: ignore[arg-type]
            StepPlan("B"),
        )
    )


def test_pause_resume_and_timeout() -> None:
    plan = pause_plan()
    p = run_ok(plan, saga.start(plan, saga=True).progress)
    assert saga.next_action(p, plan) == saga.Pause("H")
    assert saga.next_action(p) == saga.Run("H", "forward", None)  # without a plan: as before
    paused = saga.pause(plan, p)
    assert [e.name for e in paused.events] == ["workflow_paused", "status_changed"]
    q = rt(paused.progress)
    assert q.status is S.PAUSED
    assert q.current_step == "H"
    assert saga.next_action(q, plan) == saga.Stop(S.PAUSED)
    resumed = saga.resume(plan, q)
    assert resumed.progress.status is S.ACTIVE
    assert resumed.progress.next_step == "B"
    assert resumed.progress.completed == ("A", "H")
    timed_out = saga.pause_timed_out(plan, q, error="no input within 5 s")
    assert timed_out.progress.status is S.COMPENSATING
    assert timed_out.progress.to_compensate == ("A",)
    assert timed_out.progress.failed_step == "H"
    go_on = saga.pause_timed_out(pause_plan("continue"), q)
    assert go_on.progress.next_step == "B"
    with pytest.raises(ValueError, match="not waiting for input"):
        saga.resume(plan, resumed.progress)


def test_cancel_of_a_paused_workflow_compensates() -> None:
    plan = pause_plan()
    p = run_ok(plan, saga.start(plan, saga=True).progress)
    q = saga.pause(plan, p).progress
    change = saga.cancel(plan, q)
    assert change.progress.status is S.COMPENSATING
    assert change.progress.to_compensate == ("A",)


def parallel_plan() -> Plan:
    inner = tuple(StepPlan(n, compensable=True) for n in ("L1", "L2", "R1"))
    return Plan(
        (
            StepPlan("A", compensable=True),
            StepPlan("P", kind="PARALLEL", branches=(("L1", "L2"), ("R1",))),
            StepPlan("B"),
        ),
        inner,
    )


def test_parallel_runs_each_branch_at_its_own_position() -> None:
    plan = parallel_plan()
    p = run_ok(plan, saga.start(plan, saga=True).progress)
    assert saga.next_action(p, plan) == saga.Fork("P")
    assert [r.step for r in saga.branch_actions(plan, p)] == ["L1", "R1"]
    p = rt(saga.branch_begin(plan, p, "L1").progress)
    p = rt(saga.branch_begin(plan, p, "R1").progress)
    assert saga.branch_actions(plan, p) == ()
    p = rt(saga.branch_succeeded(plan, p, "L1").progress)
    assert [r.step for r in saga.branch_actions(plan, p)] == ["L2"]
    p = rt(saga.branch_begin(plan, p, "L2").progress)
    p = rt(saga.branch_succeeded(plan, p, "R1").progress)
    change = saga.branch_succeeded(plan, p, "L2")
    assert change.progress.next_step == "B"
    assert change.progress.completed == ("A", "L1", "R1", "L2", "P")
    assert [e.step for e in change.events] == ["L2", "P"]


def test_a_failed_branch_halts_and_rolls_back_every_branch_newest_first() -> None:
    plan = parallel_plan()
    p = run_ok(plan, saga.start(plan, saga=True).progress)
    p = saga.branch_begin(plan, p, "L1").progress
    p = saga.branch_begin(plan, p, "R1").progress
    p = saga.branch_succeeded(plan, p, "R1").progress
    halted = saga.branch_failed(plan, p, "L1", "boom")  # L1 has no retry left
    assert halted.progress.status is S.COMPENSATING
    assert halted.progress.to_compensate == ("R1", "A")  # L1 never completed
    # With another branch still running, the halt waits for it; a stopped one is undone first.
    p = saga.branch_begin(plan, run_ok(plan, saga.start(plan, saga=True).progress), "L1").progress
    p = saga.branch_begin(plan, p, "R1").progress
    p = saga.branch_failed(plan, p, "R1", "boom").progress
    assert p.status is S.ACTIVE
    assert p.failed_step == "R1"
    assert saga.branch_actions(plan, p) == ()
    done = saga.branch_cancelled(plan, p, "L1", "stopped")
    assert done.progress.to_compensate == ("L1", "A")
    assert done.progress.failed_step == "P"  # retry resumes the PARALLEL


def test_a_crash_mid_branch_reruns_that_branch_step() -> None:
    plan = parallel_plan()
    p = run_ok(plan, saga.start(plan, saga=True).progress)
    p = saga.branch_begin(plan, p, "L1").progress
    p = rt(saga.branch_interrupted(plan, p, "L1").progress)
    assert p.interrupts == {"f:L1": 1}
    assert [r.step for r in saga.branch_actions(plan, p)] == ["L1", "R1"]


def test_failure_after_the_pivot_fails_with_an_alert_and_retry_resumes_there() -> None:
    plan = Plan(
        (
            StepPlan("A", compensable=True),
            StepPlan("Pv", pivot=True),
            StepPlan("C", max_attempts=1),
        )
    )
    p = run_ok(plan, run_ok(plan, saga.start(plan, saga=True).progress))
    p = saga.begin(p, "C", "forward").progress
    change = saga.failed(plan, p, "boom")
    assert change.progress.status is S.FAILED
    assert change.progress.to_compensate == ()
    assert change.alert == saga.Alert("failed_after_pivot", "C", "boom")
    again = saga.retry(plan, change.progress)
    assert again.progress.next_step == "C"
    assert again.progress.status is S.ACTIVE


def test_standard_only_progress_json_has_no_new_keys() -> None:
    plan = Plan((StepPlan("A"), StepPlan("B")))
    p = run_ok(plan, saga.start(plan, saga=True).progress)
    assert set(p.to_json()) == {"status", "saga", "next_step", "completed", "journal_seq"}
