"""The pure saga state machine (agent._saga): unit tests, no I/O (the hypothesis properties are in
test_saga_properties.py)."""

from __future__ import annotations

import json

import pytest

from agent import WorkflowStatus
from agent._saga import (
    CANCEL_RULE,
    INTERRUPTED,
    RETRY_RULE,
    Alert,
    Change,
    Event,
    Inflight,
    Plan,
    Progress,
    Run,
    StepPlan,
    Stop,
    begin,
    can_cancel,
    can_retry,
    cancel,
    cancel_inflight,
    continues,
    failed,
    internal_error,
    interrupted,
    next_action,
    retry,
    start,
    succeeded,
)

S = WorkflowStatus


def plan_of(*steps: StepPlan) -> Plan:
    return Plan(tuple(steps))


ABC = plan_of(
    StepPlan("A", compensable=True),
    StepPlan("B", compensable=False),
    StepPlan("C", compensable=True),
    StepPlan("D", compensable=True),
)


def new(plan: Plan, *, saga: bool) -> Progress:
    return start(plan, saga=saga).progress


def started(p: Progress) -> Progress:
    """Begin whatever is next."""
    action = next_action(p)
    assert isinstance(action, Run)
    return begin(p, action.step, action.phase).progress


def run_ok(plan: Plan, p: Progress) -> Progress:
    """Run whatever is next and let it succeed."""
    action = next_action(p)
    assert isinstance(action, Run)
    return succeeded(plan, begin(p, action.step, action.phase).progress).progress


def run_fail(plan: Plan, p: Progress, now: float = 0.0) -> Progress:
    action = next_action(p)
    assert isinstance(action, Run)
    return failed(plan, begin(p, action.step, action.phase).progress, "boom", now=now).progress


def run_interrupt(plan: Plan, p: Progress) -> Progress:
    action = next_action(p)
    assert isinstance(action, Run)
    return interrupted(plan, begin(p, action.step, action.phase).progress).progress


def roundtrip(p: Progress) -> Progress:
    return Progress.from_json(json.loads(json.dumps(p.to_json())))


# ------------------------------------------------------------------------------------------------
# Unit tests


def test_plan_rejects_duplicates_and_empty() -> None:
    with pytest.raises(ValueError, match="unique"):
        plan_of(StepPlan("A"), StepPlan("A"))
    with pytest.raises(ValueError, match="at least one"):
        plan_of()


def test_start_and_next_action() -> None:
    p = new(ABC, saga=True)
    assert p.status is S.ACTIVE
    assert p.saga is True
    assert p.next_step == "A"
    assert next_action(p) == Run("A", "forward", None)
    assert p.current_step == "A"


def test_begin_records_the_attempt_and_blocks_next_action() -> None:
    p = begin(new(ABC, saga=False), "A", "forward").progress
    assert p.inflight is not None
    assert (p.inflight.step, p.inflight.phase, p.inflight.seq, p.inflight.attempt) == (
        "A",
        "forward",
        1,
        1,
    )
    assert p.journal_seq == 1
    assert p.executions == {"f:A": 1}
    assert p.current_step == "A"
    with pytest.raises(ValueError, match="in flight"):
        next_action(p)


def test_begin_refuses_a_step_that_is_not_next() -> None:
    p = new(ABC, saga=False)
    with pytest.raises(ValueError, match="not what runs next"):
        begin(p, "B", "forward")
    with pytest.raises(ValueError, match="not what runs next"):
        begin(p, "A", "compensate")


def test_succeeded_walks_forward_to_completed() -> None:
    p = new(ABC, saga=False)
    for expected_next in ("B", "C", "D"):
        p = run_ok(ABC, p)
        assert p.status is S.ACTIVE
        assert p.next_step == expected_next
        assert p.inflight is None
    p = run_ok(ABC, p)
    assert p.status is S.COMPLETED
    assert p.completed == ("A", "B", "C", "D")
    assert next_action(p) == Stop(S.COMPLETED)
    assert p.journal_seq == 4


def test_succeeded_and_failed_need_an_inflight_attempt() -> None:
    p = new(ABC, saga=False)
    with pytest.raises(ValueError, match="No attempt"):
        succeeded(ABC, p)
    with pytest.raises(ValueError, match="No attempt"):
        failed(ABC, p, "x")
    with pytest.raises(ValueError, match="No attempt"):
        interrupted(ABC, p)


def test_failed_retries_with_backoff_then_fails_without_saga() -> None:
    plan = plan_of(StepPlan("A", max_attempts=3, retry_delays=(0.5, 2.0)))
    p = run_fail(plan, new(plan, saga=False), now=100.0)
    assert p.status is S.ACTIVE
    assert p.failures == {"f:A": 1}
    assert p.error == "boom"
    assert next_action(p) == Run("A", "forward", 100.5)
    p = run_fail(plan, p, now=200.0)
    assert next_action(p) == Run("A", "forward", 202.0)
    p = begin(p, "A", "forward").progress
    assert p.inflight is not None
    assert p.inflight.attempt == 3
    assert p.not_before is None
    p = failed(plan, p, "third", now=300.0).progress
    assert p.status is S.FAILED
    assert p.failed_step == "A"
    assert p.error == "third"
    assert next_action(p) == Stop(S.FAILED)


def test_success_after_failures_clears_the_failure_count() -> None:
    plan = plan_of(StepPlan("A", max_attempts=3), StepPlan("B"))
    p = run_fail(plan, new(plan, saga=False))
    p = run_ok(plan, p)
    assert p.failures == {}
    assert p.next_step == "B"


def test_failure_in_saga_mode_compensates_completed_steps_newest_first() -> None:
    p = new(ABC, saga=True)
    for _ in range(3):
        p = run_ok(ABC, p)
    p = run_fail(ABC, p)  # D fails
    assert p.status is S.COMPENSATING
    assert p.failed_step == "D"
    assert p.to_compensate == ("C", "A")  # B has no compensation; D never completed
    assert next_action(p) == Run("C", "compensate", None)
    assert p.current_step == "C"
    p = run_ok(ABC, p)
    p = run_ok(ABC, p)
    assert p.status is S.FAILED_ROLLED_BACK
    assert p.compensated == ("C", "A")
    assert next_action(p) == Stop(S.FAILED_ROLLED_BACK)


def test_first_step_failure_in_saga_mode_is_rolled_back_at_once() -> None:
    p = run_fail(ABC, new(ABC, saga=True))
    assert p.status is S.FAILED_ROLLED_BACK
    assert p.to_compensate == ()
    assert p.compensated == ()


def test_compensation_failure_is_retried_then_recorded() -> None:
    plan = plan_of(
        StepPlan("A", compensable=True),
        StepPlan("B", compensable=True, compensate_max_attempts=2, compensate_retry_delays=(1.0,)),
        StepPlan("C"),
    )
    p = run_ok(plan, run_ok(plan, new(plan, saga=True)))
    p = run_fail(plan, p)  # C fails
    assert p.to_compensate == ("B", "A")
    p = run_fail(plan, p, now=10.0)  # undo B fails once: retried
    assert next_action(p) == Run("B", "compensate", 11.0)
    p = run_fail(plan, p)  # and again: given up, the rollback goes on
    assert p.compensation_failed == ("B",)
    assert next_action(p) == Run("A", "compensate", None)
    p = run_ok(plan, p)
    assert p.status is S.COMPENSATION_FAILED
    assert p.compensated == ("A",)


def test_interrupt_does_not_count_against_retry() -> None:
    plan = plan_of(StepPlan("A", max_attempts=2, max_interrupts=3))
    p = run_interrupt(plan, new(plan, saga=False))
    p = run_interrupt(plan, p)
    assert p.failures == {}
    assert p.interrupts == {"f:A": 2}
    p = run_fail(plan, p)
    assert p.status is S.ACTIVE  # one attempt of two used
    p = begin(p, "A", "forward").progress
    assert p.inflight is not None
    assert p.inflight.attempt == 4
    p = failed(plan, p, "second failure").progress
    assert p.status is S.FAILED


def test_interrupted_max_times_compensates_itself_first() -> None:
    plan = plan_of(
        StepPlan("A", compensable=True),
        StepPlan("B", compensable=True, max_interrupts=2),
    )
    p = run_ok(plan, new(plan, saga=True))
    p = run_interrupt(plan, p)
    assert p.status is S.ACTIVE
    assert next_action(p) == Run("B", "forward", None)
    p = run_interrupt(plan, p)
    assert p.status is S.COMPENSATING
    assert p.failed_step == "B"
    assert "max_interrupts" in (p.error or "")
    assert p.to_compensate == ("B", "A")
    p = run_ok(plan, run_ok(plan, p))
    assert p.status is S.FAILED_ROLLED_BACK
    assert p.compensated == ("B", "A")


def test_interrupted_max_times_without_saga_fails() -> None:
    plan = plan_of(StepPlan("A", compensable=True, max_interrupts=1))
    p = run_interrupt(plan, new(plan, saga=False))
    assert p.status is S.FAILED
    assert p.to_compensate == ()


def test_interrupted_compensation_gives_up_after_max_interrupts() -> None:
    plan = plan_of(StepPlan("A", compensable=True, max_interrupts=2), StepPlan("B"))
    p = run_fail(plan, run_ok(plan, new(plan, saga=True)))
    assert p.to_compensate == ("A",)
    p = run_interrupt(plan, p)
    assert next_action(p) == Run("A", "compensate", None)
    p = run_interrupt(plan, p)
    assert p.status is S.COMPENSATION_FAILED
    assert p.compensation_failed == ("A",)


def test_cancel_idle_saga_compensates_then_cancelled() -> None:
    p = run_ok(ABC, run_ok(ABC, new(ABC, saga=True)))
    p = cancel(ABC, p, reason="operator").progress
    assert p.cancelled is True
    assert p.status is S.COMPENSATING
    assert p.to_compensate == ("A",)  # B is not compensable
    assert p.error == "operator"
    p = run_ok(ABC, p)
    assert p.status is S.CANCELLED


def test_cancel_idle_without_saga_is_immediate() -> None:
    p = cancel(ABC, run_ok(ABC, new(ABC, saga=False))).progress
    assert p.status is S.CANCELLED
    assert p.to_compensate == ()
    assert next_action(p) == Stop(S.CANCELLED)


def test_cancel_of_a_finished_workflow_is_refused() -> None:
    p = run_fail(ABC, new(ABC, saga=False))
    with pytest.raises(ValueError, match="cannot be cancelled"):
        cancel(ABC, p)


def test_cancel_inflight_compensates_the_stopped_step_first() -> None:
    p = run_ok(ABC, new(ABC, saga=True))
    p = run_ok(ABC, p)
    p = begin(p, "C", "forward").progress
    p = cancel(ABC, p).progress
    assert p.status is S.ACTIVE  # only the flag: the runner stops the attempt
    assert p.cancelled
    assert p.inflight is not None
    p = cancel_inflight(ABC, p, "stopped").progress
    assert p.inflight is None
    assert p.status is S.COMPENSATING
    assert p.to_compensate == ("C", "A")
    p = run_ok(ABC, run_ok(ABC, p))
    assert p.status is S.CANCELLED


def test_cancel_inflight_without_saga() -> None:
    p = cancel(ABC, begin(new(ABC, saga=False), "A", "forward").progress).progress
    p = cancel_inflight(ABC, p, "stopped").progress
    assert p.status is S.CANCELLED
    assert p.to_compensate == ()


def test_cancel_while_inflight_then_step_completes_without_saga_compensates_nothing() -> None:
    """Without saga mode a cancel ends in CANCELLED with nothing compensated, also when
    the running step (a sync one, which cannot be stopped) completes after the cancel."""
    p = cancel(ABC, begin(new(ABC, saga=False), "A", "forward").progress).progress
    p = succeeded(ABC, p).progress
    assert p.status is S.CANCELLED
    assert p.to_compensate == ()


def test_cancel_while_inflight_then_step_completes_in_saga_compensates_it() -> None:
    p = cancel(ABC, begin(new(ABC, saga=True), "A", "forward").progress).progress
    p = succeeded(ABC, p).progress
    assert p.status is S.COMPENSATING
    assert p.to_compensate == ("A",)
    assert run_ok(ABC, p).status is S.CANCELLED


def test_compensation_during_cancel_rollback_is_retried() -> None:
    """A compensation that raises is retried, also in the rollback of a cancel."""
    plan = plan_of(StepPlan("A", compensable=True, compensate_max_attempts=3), StepPlan("B"))
    p = cancel(plan, run_ok(plan, new(plan, saga=True))).progress
    assert p.to_compensate == ("A",)
    p = run_fail(plan, p)
    assert p.compensation_failed == ()
    assert next_action(p) == Run("A", "compensate", None)
    p = run_ok(plan, p)
    assert p.status is S.CANCELLED


def test_retry_failed_resumes_at_the_failed_step() -> None:
    plan = plan_of(StepPlan("A"), StepPlan("B", max_attempts=1), StepPlan("C"))
    p = run_fail(plan, run_ok(plan, new(plan, saga=False)))
    assert p.status is S.FAILED
    p = retry(plan, p).progress
    assert p.status is S.ACTIVE
    assert p.next_step == "B"
    assert p.failed_step is None
    assert p.error is None
    assert p.failures == {}
    assert p.completed == ("A",)
    p = run_ok(plan, run_ok(plan, p))
    assert p.status is S.COMPLETED
    assert p.completed == ("A", "B", "C")


def test_retry_compensation_failed_reruns_the_failed_compensations() -> None:
    plan = plan_of(
        StepPlan("A", compensable=True, compensate_max_attempts=1),
        StepPlan("B", compensable=True, compensate_max_attempts=1),
        StepPlan("C"),
    )
    p = run_ok(plan, run_ok(plan, new(plan, saga=True)))
    p = run_fail(plan, p)  # C
    p = run_fail(plan, p)  # undo B
    p = run_fail(plan, p)  # undo A
    assert p.status is S.COMPENSATION_FAILED
    assert p.compensation_failed == ("B", "A")
    p = retry(plan, p).progress
    assert p.status is S.COMPENSATING
    assert p.to_compensate == ("B", "A")
    assert p.compensation_failed == ()
    p = run_ok(plan, run_ok(plan, p))
    assert p.status is S.FAILED_ROLLED_BACK


@pytest.mark.parametrize("status", [S.COMPLETED, S.FAILED_ROLLED_BACK, S.ACTIVE, S.CANCELLED])
def test_retry_is_refused_for_other_statuses(status: WorkflowStatus) -> None:
    with pytest.raises(ValueError, match="cannot be retried: only FAILED and COMPENSATION_FAILED"):
        retry(ABC, Progress(status=status, next_step="A"))


def test_continues_follows_automate_next() -> None:
    plan = plan_of(StepPlan("A", automate_next=True), StepPlan("B"), StepPlan("C"))
    before = begin(new(plan, saga=False), "A", "forward").progress
    after = succeeded(plan, before).progress
    assert continues(plan, before, after) is True
    before = begin(after, "B", "forward").progress
    after = succeeded(plan, before).progress
    assert continues(plan, before, after) is False


def test_progress_json_roundtrip_and_unknown_keys() -> None:
    p = begin(run_fail(ABC, run_ok(ABC, new(ABC, saga=True)), now=5.0), "A", "compensate").progress
    data = p.to_json()
    assert data["status"] == "COMPENSATING"
    assert isinstance(data["completed"], list)
    assert roundtrip(p) == p
    assert Progress.from_json({**data, "added_in_a_later_version": 1}) == p


# ------------------------------------------------------------------------------------------------
# What a transition decides besides the progress: events, alerts, the status change


def test_start_announces_the_workflow() -> None:
    change = start(ABC, saga=True)
    assert change == Change(
        Progress(status=S.ACTIVE, saga=True, next_step="A"),
        (Event("workflow_started", "A"),),
        None,
        False,
    )


def test_begin_announces_the_attempt_of_its_phase() -> None:
    p = new(ABC, saga=True)
    change = begin(p, "A", "forward")
    assert change.events == (Event("step_started", "A", 1),)
    assert change.alert is None
    assert change.status_changed is False
    p = run_fail(ABC, run_ok(ABC, run_ok(ABC, p)))  # B completed, C fails: undo A
    change = begin(p, "A", "compensate")
    assert change.events == (Event("compensation_started", "A", 1),)
    assert change.status_changed is False


def test_a_completed_step_that_changes_nothing_else_is_one_event() -> None:
    change = succeeded(ABC, begin(new(ABC, saga=False), "A", "forward").progress)
    assert change.events == (Event("step_completed", "A", 1),)
    assert change.status_changed is False


def test_the_last_step_completing_announces_completed() -> None:
    plan = plan_of(StepPlan("A", max_attempts=2))
    p = run_fail(plan, new(plan, saga=False))
    change = succeeded(plan, started(p))
    assert change.events == (
        Event("step_completed", "A", 2),
        Event("status_changed", None, None, None),
    )
    assert change.status_changed is True
    assert change.progress.status is S.COMPLETED
    assert change.progress.error is None  # the failure before the success is over


def test_a_retried_failure_is_one_event_and_no_status_change() -> None:
    plan = plan_of(StepPlan("A", max_attempts=2))
    change = failed(plan, started(new(plan, saga=False)), "Boom: no")
    assert change.events == (Event("step_failed", "A", 1, "Boom: no"),)
    assert change.alert is None
    assert change.status_changed is False


def test_a_forward_failure_given_up_announces_the_rollback() -> None:
    p = run_ok(ABC, new(ABC, saga=True))
    change = failed(ABC, started(p), "Boom: no")
    assert change.events == (
        Event("step_failed", "B", 1, "Boom: no"),
        Event("status_changed", "A", None, "Boom: no"),  # the compensation that runs now
    )
    assert change.alert is None
    assert change.progress.status is S.COMPENSATING


def test_a_compensation_given_up_raises_an_alert() -> None:
    plan = plan_of(
        StepPlan("A", compensable=True, compensate_max_attempts=2),
        StepPlan("B", compensable=True, compensate_max_attempts=1),
        StepPlan("C"),
    )
    p = run_fail(plan, run_ok(plan, run_ok(plan, new(plan, saga=True))))
    assert p.to_compensate == ("B", "A")
    change = failed(plan, started(p), "undo B: no")
    assert change.events == (Event("compensation_failed", "B", 1, "undo B: no"),)
    assert change.alert == Alert("compensation_failed", "B", "undo B: no")
    assert change.status_changed is False  # the rollback goes on with A
    p = change.progress
    change = failed(plan, started(p), "undo A: no")
    assert change.alert is None  # retried: not given up yet
    change = failed(plan, started(change.progress), "undo A: still no")
    assert change.alert == Alert("compensation_failed", "A", "undo A: still no")
    assert change.events[-1] == Event("status_changed", "C", None, "undo A: still no")
    assert change.progress.status is S.COMPENSATION_FAILED


def test_an_interrupted_attempt_fails_with_the_interrupted_error() -> None:
    plan = plan_of(StepPlan("A", compensable=True, max_interrupts=2), StepPlan("B"))
    change = interrupted(plan, started(new(plan, saga=True)))
    assert change.events == (Event("step_failed", "A", 1, INTERRUPTED),)
    assert change.progress.error is None  # it runs again
    assert change.status_changed is False


def test_a_compensation_interrupted_too_often_raises_an_alert() -> None:
    plan = plan_of(StepPlan("A", compensable=True, max_interrupts=1), StepPlan("B"))
    p = run_fail(plan, run_ok(plan, new(plan, saga=True)))
    change = interrupted(plan, started(p))
    msg = "Compensation of step 'A' was interrupted 1 times (max_interrupts); it is not run again."
    assert change.progress.error == msg
    assert change.events == (
        Event("compensation_failed", "A", 1, INTERRUPTED),
        Event("status_changed", "B", None, msg),
    )
    assert change.alert == Alert("compensation_failed", "A", msg)


def test_a_forward_step_interrupted_too_often_fails_without_an_alert() -> None:
    plan = plan_of(StepPlan("A", max_interrupts=2))
    p = run_interrupt(plan, new(plan, saga=False))
    change = interrupted(plan, started(p))
    msg = "step 'A' was interrupted 2 times (max_interrupts); it is not run again."
    assert change.progress.error == msg
    assert change.progress.failed_step == "A"
    assert change.events == (
        Event("step_failed", "A", 2, INTERRUPTED),
        Event("status_changed", "A", None, msg),
    )
    assert change.alert is None


def test_cancel_announces_its_status_and_nothing_else() -> None:
    change = cancel(ABC, new(ABC, saga=False), reason="operator")
    assert change.events == (Event("status_changed", None, None, "operator"),)
    assert change.status_changed is True
    # With an attempt in flight only the flag is set: no status change, no event.
    change = cancel(ABC, started(new(ABC, saga=False)), reason="operator")
    assert change.events == ()
    assert change.status_changed is False
    assert change.progress.cancelled is True


def test_cancel_inflight_fails_the_attempt_with_the_reason() -> None:
    p = cancel(ABC, started(new(ABC, saga=True)), reason="operator").progress
    change = cancel_inflight(ABC, p, "operator")
    assert change.events == (
        Event("step_failed", "A", 1, "operator"),
        Event("status_changed", "A", None, "operator"),  # A's own compensation runs first
    )
    assert change.progress.status is S.COMPENSATING


def test_internal_error_fails_the_attempt_and_alerts() -> None:
    p = started(run_ok(ABC, new(ABC, saga=True)))
    change = internal_error(p, "internal error: KeyError: 'x'")
    assert change.events == (
        Event("step_failed", "B", 1, "internal error: KeyError: 'x'"),
        Event("status_changed", "B", None, "internal error: KeyError: 'x'"),
    )
    assert change.alert == Alert("internal_error", "B", "internal error: KeyError: 'x'")


def test_internal_error_between_attempts_alerts_without_a_failed_attempt() -> None:
    p = run_fail(ABC, run_ok(ABC, run_ok(ABC, run_ok(ABC, new(ABC, saga=True)))))
    assert p.to_compensate == ("C", "A")
    change = internal_error(p, "internal error: E")
    assert change.events == (Event("status_changed", "D", None, "internal error: E"),)
    assert change.progress.status is S.COMPENSATION_FAILED
    assert change.progress.compensation_failed == ("C", "A")  # both still due
    assert change.progress.to_compensate == ()
    assert change.alert == Alert("internal_error", "D", "internal error: E")


def test_internal_error_of_a_finished_workflow_changes_nothing_but_alerts() -> None:
    p = run_ok(ABC, run_ok(ABC, run_ok(ABC, run_ok(ABC, new(ABC, saga=False)))))
    change = internal_error(p, "internal error: E")
    assert change.progress == p
    assert change.events == ()
    assert change.status_changed is False
    assert change.alert == Alert("internal_error", None, "internal error: E")


def test_internal_error_at_a_due_step_fails_there() -> None:
    p = run_ok(ABC, new(ABC, saga=False))
    change = internal_error(p._replace(not_before=5.0), "internal error: E")
    assert change.progress == p._replace(
        status=S.FAILED, failed_step="B", error="internal error: E"
    )
    assert change.events == (Event("status_changed", "B", None, "internal error: E"),)


def test_retry_announces_the_step_it_runs() -> None:
    p = run_fail(ABC, run_ok(ABC, new(ABC, saga=False)))
    change = retry(ABC, p)
    assert change.events == (Event("status_changed", "B", None, None),)
    assert change.status_changed is True


@pytest.mark.parametrize("status", list(S))
def test_guards(status: WorkflowStatus) -> None:
    assert can_cancel(status) is (status in (S.ACTIVE, S.PAUSED))
    assert can_retry(status) is (status in (S.FAILED, S.COMPENSATION_FAILED))


def test_refusals_say_the_rule() -> None:
    assert CANCEL_RULE == "only ACTIVE or PAUSED workflows can be cancelled"
    assert RETRY_RULE == "only FAILED and COMPENSATION_FAILED workflows can be retried"
    p = run_ok(ABC, run_ok(ABC, run_ok(ABC, run_ok(ABC, new(ABC, saga=False)))))
    with pytest.raises(
        ValueError, match=f"^A COMPLETED workflow cannot be cancelled: {CANCEL_RULE}.$"
    ):
        cancel(ABC, p)
    with pytest.raises(
        ValueError, match=f"^A COMPLETED workflow cannot be retried: {RETRY_RULE}.$"
    ):
        retry(ABC, p)


# ------------------------------------------------------------------------------------------------
# Decisions no other test pinned down


def test_a_cancel_while_a_step_runs_survives_a_restart() -> None:
    """The flag is stored: after a crash, recovery still carries the cancel out."""
    p = cancel(ABC, started(new(ABC, saga=False))).progress
    assert p.to_json()["cancelled"] is True
    assert "cancelled" not in new(ABC, saga=False).to_json()
    p = roundtrip(p)
    assert p.cancelled is True
    assert succeeded(ABC, p).progress.status is S.CANCELLED
    p = roundtrip(cancel(ABC, started(new(ABC, saga=True))).progress)
    assert succeeded(ABC, p).progress.to_compensate == ("A",)


def test_progress_json_holds_every_field() -> None:
    p = Progress(
        status=S.COMPENSATING,
        saga=True,
        next_step="B",
        completed=("A",),
        to_compensate=("A",),
        compensated=("C",),
        compensation_failed=("D",),
        failed_step="B",
        error="boom",
        cancelled=True,
        failures={"f:B": 1},
        interrupts={"c:A": 2},
        executions={"c:A": 3},
        inflight=Inflight("A", "compensate", 7, 3),
        journal_seq=7,
        not_before=12.5,
    )
    assert p.to_json() == {
        "status": "COMPENSATING",
        "saga": True,
        "next_step": "B",
        "completed": ["A"],
        "to_compensate": ["A"],
        "compensated": ["C"],
        "compensation_failed": ["D"],
        "failed_step": "B",
        "error": "boom",
        "cancelled": True,
        "failures": {"f:B": 1},
        "interrupts": {"c:A": 2},
        "executions": {"c:A": 3},
        "inflight": {"step": "A", "phase": "compensate", "seq": 7, "attempt": 3},
        "journal_seq": 7,
        "not_before": 12.5,
    }
    assert roundtrip(p) == p
    assert Progress().to_json() == {"status": "ACTIVE"}
    assert roundtrip(Progress()) == Progress()


def test_a_cancel_stops_forward_retries() -> None:
    plan = plan_of(StepPlan("A", compensable=True, max_attempts=3), StepPlan("B", max_attempts=3))
    p = cancel(plan, started(new(plan, saga=False)), reason="operator").progress
    p = failed(plan, p, "Boom: no").progress
    assert p.status is S.CANCELLED  # not retried, and not FAILED: it was cancelled
    assert p.failed_step == "A"
    assert p.error == "Boom: no"
    assert next_action(p) == Stop(S.CANCELLED)
    # saga mode: the rollback starts instead of a retry
    p = cancel(plan, started(run_ok(plan, new(plan, saga=True))), reason="operator").progress
    p = failed(plan, p, "Boom: no").progress
    assert p.status is S.COMPENSATING
    assert p.to_compensate == ("A",)
    assert p.failed_step == "B"
    assert run_ok(plan, p).status is S.CANCELLED


def test_cancel_inflight_of_a_compensation_runs_it_again() -> None:
    """A cancel never stops a compensation; should one be stopped, it runs again, uncounted."""
    p = started(run_fail(ABC, run_ok(ABC, new(ABC, saga=True))))
    assert p.inflight == Inflight("A", "compensate", 3, 1)
    change = cancel_inflight(ABC, p, "stopped")
    assert change.progress == p._replace(inflight=None)
    assert change.events == (Event("compensation_failed", "A", 1, "stopped"),)
    assert next_action(change.progress) == Run("A", "compensate", None)


def test_bookkeeping_after_a_cancel() -> None:
    # idle, saga: the reason is the error, no step failed
    p = cancel(ABC, run_ok(ABC, new(ABC, saga=True)), reason="operator").progress
    assert (p.error, p.failed_step, p.next_step) == ("operator", None, None)
    p = run_ok(ABC, p)
    assert (p.status, p.error, p.failed_step) == (S.CANCELLED, "operator", None)
    # a step stopped by the cancel is the failed step; without saga nothing is due any more
    p = cancel_inflight(ABC, cancel(ABC, started(new(ABC, saga=False))).progress, "stopped")
    p = p.progress
    assert (p.status, p.error, p.failed_step, p.next_step) == (S.CANCELLED, "stopped", "A", None)
    assert p.cancelled is True
    assert p.completed == ()
    # a step that completes after the cancel is done, and nothing else is due
    p = succeeded(ABC, cancel(ABC, started(run_ok(ABC, new(ABC, saga=False)))).progress).progress
    assert (p.status, p.error, p.failed_step, p.next_step) == (
        S.CANCELLED,
        "cancelled on request",
        None,
        None,
    )
    assert p.completed == ("A", "B")
    assert p.executions == {}
    # in saga mode the stopped step is compensated first, after the others' queue is built
    p = cancel(ABC, started(run_ok(ABC, new(ABC, saga=True)))).progress
    p = cancel_inflight(ABC, p, "stopped").progress
    assert (p.status, p.error, p.failed_step, p.next_step) == (S.COMPENSATING, "stopped", "B", None)
    assert p.to_compensate == ("A",)  # B has no compensation


def test_bookkeeping_after_a_retried_success() -> None:
    plan = plan_of(StepPlan("A", max_attempts=2), StepPlan("B", max_attempts=2))
    p = run_fail(plan, new(plan, saga=False), now=1.0)
    assert (p.error, p.failed_step) == ("boom", None)
    p = run_ok(plan, p)
    # the last failure stays the workflow's error until it finishes; nothing failed for good
    assert (p.status, p.error, p.failed_step) == (S.ACTIVE, "boom", None)
    assert (p.failures, p.executions, p.interrupts) == ({}, {}, {})
    p = run_ok(plan, p)
    assert (p.status, p.error, p.failed_step) == (S.COMPLETED, None, None)


def test_a_compensation_that_succeeds_after_failing_leaves_no_counts() -> None:
    plan = plan_of(StepPlan("A", compensable=True, compensate_max_attempts=2), StepPlan("B"))
    p = run_fail(plan, run_fail(plan, run_ok(plan, new(plan, saga=True))))
    assert p.failures == {"f:B": 1, "c:A": 1}
    p = run_ok(plan, p)
    assert p.status is S.FAILED_ROLLED_BACK
    assert p.failures == {"f:B": 1}
    assert p.executions == {"f:B": 1}
    assert p.compensated == ("A",)
    assert p.to_compensate == ()


def test_retry_resets_the_failed_steps_interrupt_count() -> None:
    plan = plan_of(StepPlan("A", max_interrupts=2), StepPlan("B"))
    p = run_interrupt(plan, new(plan, saga=False))
    p = run_fail(plan, p)
    assert p.status is S.FAILED
    assert p.interrupts == {"f:A": 1}
    p = retry(plan, p._replace(interrupts={"f:A": 1, "c:B": 1})).progress
    assert p.interrupts == {"c:B": 1}  # only the retried step's count goes
    # so it may be interrupted max_interrupts - 1 times again and still run
    p = run_interrupt(plan, p)
    assert next_action(p) == Run("A", "forward", None)


def test_retry_resets_the_failed_compensations_counts() -> None:
    plan = plan_of(
        StepPlan("A", compensable=True, compensate_max_attempts=1, max_interrupts=2),
        StepPlan("B", max_attempts=2),
    )
    p = run_fail(plan, run_fail(plan, run_ok(plan, new(plan, saga=True))))
    p = run_fail(plan, run_interrupt(plan, p))  # undo A: interrupted, then failed for good
    assert p.status is S.COMPENSATION_FAILED
    assert p.interrupts == {"c:A": 1}
    assert p.failures == {"f:B": 2}
    p = retry(plan, p._replace(failures={"f:B": 2, "c:A": 1})).progress
    assert p.status is S.COMPENSATING
    assert p.interrupts == {}
    assert p.failures == {"f:B": 2}  # the forward failure stays on record
    assert p.not_before is None
    p = run_interrupt(plan, p)  # one interrupt of two: it runs again
    assert next_action(p) == Run("A", "compensate", None)


def test_retry_clears_a_pending_backoff() -> None:
    p = Progress(status=S.FAILED, failed_step="B", completed=("A",), not_before=99.0)
    assert retry(ABC, p).progress == Progress(
        status=S.ACTIVE, next_step="B", completed=("A",), not_before=None
    )
    p = Progress(status=S.COMPENSATION_FAILED, compensation_failed=("A",), not_before=99.0)
    assert retry(ABC, p).progress.not_before is None


def test_retry_needs_a_failed_step() -> None:
    with pytest.raises(ValueError, match="cannot be retried"):
        retry(ABC, Progress(status=S.FAILED))


def test_backoff_delays() -> None:
    plan = plan_of(StepPlan("A", max_attempts=5, retry_delays=(1.0, 3.0)))
    p = new(plan, saga=False)
    waits = []
    for now in (10.0, 20.0, 30.0):
        p = run_fail(plan, p, now=now)
        assert p.not_before is not None
        waits.append(p.not_before - now)
    assert waits == [1.0, 3.0, 3.0]  # the last delay repeats
    plan = plan_of(StepPlan("A", max_attempts=3, retry_delays=(0.0,)))
    assert run_fail(plan, new(plan, saga=False), now=5.0).not_before is None  # no wait
    plan = plan_of(StepPlan("A", max_attempts=3, retry_delays=(2.0,)))
    assert failed(plan, started(new(plan, saga=False)), "x").progress.not_before == 2.0


def test_compensation_backoff_uses_its_own_delays() -> None:
    plan = plan_of(
        StepPlan(
            "A",
            compensable=True,
            retry_delays=(50.0,),
            compensate_max_attempts=3,
            compensate_retry_delays=(1.0, 4.0),
        ),
        StepPlan("B"),
    )
    p = run_fail(plan, run_ok(plan, new(plan, saga=True)))
    p = run_fail(plan, p, now=10.0)
    assert p.not_before == 11.0
    p = run_fail(plan, p, now=20.0)
    assert p.not_before == 24.0
    p = run_fail(plan, p, now=30.0)  # given up: no wait left behind
    assert p.not_before is None
    assert p.status is S.COMPENSATION_FAILED


def test_default_cancel_reason() -> None:
    assert cancel(ABC, new(ABC, saga=False)).progress.error == "cancelled on request"


def test_current_step_in_each_status() -> None:
    assert Progress(status=S.ACTIVE, next_step="B", failed_step="X").current_step == "B"
    assert (
        Progress(status=S.COMPENSATING, to_compensate=("A",), failed_step="X").current_step == "A"
    )
    assert Progress(status=S.COMPENSATING, failed_step="X").current_step == "X"
    assert Progress(status=S.FAILED, next_step="B", failed_step="X").current_step == "X"
    assert Progress(status=S.COMPLETED, next_step="B").current_step is None
    fl = Inflight("C", "forward", 1, 1)
    assert Progress(status=S.COMPENSATING, to_compensate=("A",), inflight=fl).current_step == "C"


def test_next_action_in_each_status() -> None:
    assert next_action(
        Progress(status=S.COMPENSATING, to_compensate=("A",), not_before=3.0)
    ) == Run("A", "compensate", 3.0)
    assert next_action(Progress(status=S.COMPENSATING)) == Stop(S.COMPENSATING)
    assert next_action(Progress(status=S.PAUSED, next_step="A")) == Stop(S.PAUSED)
    assert next_action(Progress(status=S.ACTIVE, next_step="A", not_before=2.0)) == Run(
        "A", "forward", 2.0
    )
    assert next_action(Progress(status=S.ACTIVE)) == Stop(S.ACTIVE)


def test_plan_value_semantics() -> None:
    steps = (StepPlan("A"), StepPlan("B", compensable=True))
    assert Plan(steps) == Plan(steps)
    assert hash(Plan(steps)) == hash(Plan(steps))
    assert Plan(steps) != Plan(steps[:1])
    assert Plan(steps).__eq__(steps) is NotImplemented
    assert repr(Plan(steps[:1])) == f"Plan(steps={steps[:1]!r})"
    assert Plan(steps).first == "A"
    assert Plan(steps).after("A") == "B"
    assert Plan(steps).after("B") is None
    assert Plan(steps).get("B") is steps[1]


def test_step_plan_defaults() -> None:
    assert StepPlan("A") == StepPlan("A", False, 1, 3, 3, False, (), ())


def test_continues_only_after_a_forward_step_that_leaves_it_active() -> None:
    plan = plan_of(StepPlan("A", compensable=True, automate_next=True), StepPlan("B"))
    before = started(new(plan, saga=True))
    assert continues(plan, before, succeeded(plan, before).progress) is True
    assert continues(plan, started(before._replace(inflight=None)), before) is True
    # cancelled while it ran: the rollback follows, not the next step
    cancelled = cancel(plan, before).progress
    assert continues(plan, cancelled, succeeded(plan, cancelled).progress) is False
    # no attempt, or a compensation
    assert continues(plan, new(plan, saga=True), new(plan, saga=True)) is False
    comp = started(run_fail(plan, run_ok(plan, new(plan, saga=True))))
    assert continues(plan, comp, comp._replace(status=S.ACTIVE, next_step="B")) is False
    # the last step: nothing to go on with
    last = plan_of(StepPlan("A", automate_next=True))
    before = started(new(last, saga=False))
    assert continues(last, before, before._replace(next_step=None)) is False


def test_refusals_are_exact_sentences() -> None:
    with pytest.raises(ValueError, match=r"^Step names must be unique within a plan\.$"):
        plan_of(StepPlan("A"), StepPlan("A"))
    with pytest.raises(ValueError, match=r"^A plan needs at least one step\.$"):
        plan_of()
    with pytest.raises(
        ValueError,
        match=r"^An attempt is in flight; record its outcome \(or mark it interrupted\) first\.$",
    ):
        next_action(started(new(ABC, saga=False)))
    with pytest.raises(ValueError, match=r"^No attempt is in flight\.$"):
        succeeded(ABC, new(ABC, saga=False))
    with pytest.raises(
        ValueError,
        match=r"^forward step 'B' is not what runs next \(Run\(step='A', phase='forward', "
        r"not_before=None\)\)\.$",
    ):
        begin(new(ABC, saga=False), "B", "forward")


def test_plan_hashes_as_its_steps() -> None:
    steps = (StepPlan("A"), StepPlan("B"))
    assert hash(Plan(steps)) == hash(steps)


def test_a_completed_step_leaves_no_interrupt_count() -> None:
    plan = plan_of(StepPlan("A", compensable=True, max_interrupts=3), StepPlan("B"))
    p = run_ok(plan, run_interrupt(plan, new(plan, saga=True)))
    assert p.interrupts == {}
    assert p.next_step == "B"
    p = run_interrupt(plan, run_fail(plan, p))  # B fails; undo A is interrupted once
    assert p.interrupts == {"c:A": 1}
    p = run_ok(plan, p)
    assert p.status is S.FAILED_ROLLED_BACK
    assert p.interrupts == {}
    # and after a cancel that came while it ran
    p = started(run_interrupt(plan, new(plan, saga=True)))
    p = succeeded(plan, cancel(plan, p).progress).progress
    assert p.interrupts == {}
    assert p.to_compensate == ("A",)


def test_a_compensation_given_up_leaves_no_failure_count() -> None:
    plan = plan_of(StepPlan("A", compensable=True, compensate_max_attempts=2), StepPlan("B"))
    p = run_fail(plan, run_fail(plan, run_fail(plan, run_ok(plan, new(plan, saga=True)))))
    assert p.status is S.COMPENSATION_FAILED
    assert p.failures == {"f:B": 1}


def test_a_cancel_during_a_backoff_rolls_back_at_once() -> None:
    plan = plan_of(
        StepPlan("A", compensable=True), StepPlan("B", max_attempts=2, retry_delays=(50.0,))
    )
    p = run_fail(plan, run_ok(plan, new(plan, saga=True)), now=10.0)
    assert next_action(p) == Run("B", "forward", 60.0)
    p = cancel(plan, p).progress
    assert next_action(p) == Run("A", "compensate", None)  # no waiting for B's backoff
    assert run_ok(plan, p).status is S.CANCELLED


def test_a_cancel_without_saga_leaves_nothing_due() -> None:
    p = cancel(ABC, run_ok(ABC, new(ABC, saga=False))).progress
    assert (p.status, p.next_step, p.current_step) == (S.CANCELLED, None, None)
    assert p.completed == ("A",)


def test_cancel_inflight_marks_the_workflow_cancelled_itself() -> None:
    """Stopping the attempt is the cancel: the rollback it starts ends CANCELLED."""
    p = started(run_ok(ABC, new(ABC, saga=True)))
    assert p.cancelled is False
    p = cancel_inflight(ABC, p, "stopped").progress
    assert p.cancelled is True
    assert p.to_compensate == ("A",)
    assert run_ok(ABC, p).status is S.CANCELLED
