"""The pure saga state machine (agent._saga): unit tests and hypothesis properties, no I/O."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import WorkflowStatus
from agent._saga import (
    Plan,
    Progress,
    Run,
    StepPlan,
    Stop,
    begin,
    cancel,
    cancel_inflight,
    continues,
    failed,
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


def run_ok(plan: Plan, p: Progress) -> Progress:
    """Run whatever is next and let it succeed."""
    action = next_action(p)
    assert isinstance(action, Run)
    return succeeded(plan, begin(p, action.step, action.phase))


def run_fail(plan: Plan, p: Progress, now: float = 0.0) -> Progress:
    action = next_action(p)
    assert isinstance(action, Run)
    return failed(plan, begin(p, action.step, action.phase), "boom", now=now)


def run_interrupt(plan: Plan, p: Progress) -> Progress:
    action = next_action(p)
    assert isinstance(action, Run)
    return interrupted(plan, begin(p, action.step, action.phase))


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
    p = start(ABC, saga=True)
    assert p.status is S.ACTIVE
    assert p.saga is True
    assert p.next_step == "A"
    assert next_action(p) == Run("A", "forward", None)
    assert p.current_step == "A"


def test_begin_records_the_attempt_and_blocks_next_action() -> None:
    p = begin(start(ABC, saga=False), "A", "forward")
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
    p = start(ABC, saga=False)
    with pytest.raises(ValueError, match="not what runs next"):
        begin(p, "B", "forward")
    with pytest.raises(ValueError, match="not what runs next"):
        begin(p, "A", "compensate")


def test_succeeded_walks_forward_to_completed() -> None:
    p = start(ABC, saga=False)
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
    p = start(ABC, saga=False)
    with pytest.raises(ValueError, match="No attempt"):
        succeeded(ABC, p)
    with pytest.raises(ValueError, match="No attempt"):
        failed(ABC, p, "x")
    with pytest.raises(ValueError, match="No attempt"):
        interrupted(ABC, p)


def test_failed_retries_with_backoff_then_fails_without_saga() -> None:
    plan = plan_of(StepPlan("A", max_attempts=3, retry_delays=(0.5, 2.0)))
    p = run_fail(plan, start(plan, saga=False), now=100.0)
    assert p.status is S.ACTIVE
    assert p.failures == {"f:A": 1}
    assert p.error == "boom"
    assert next_action(p) == Run("A", "forward", 100.5)
    p = run_fail(plan, p, now=200.0)
    assert next_action(p) == Run("A", "forward", 202.0)
    p = begin(p, "A", "forward")
    assert p.inflight is not None
    assert p.inflight.attempt == 3
    assert p.not_before is None
    p = failed(plan, p, "third", now=300.0)
    assert p.status is S.FAILED
    assert p.failed_step == "A"
    assert p.error == "third"
    assert next_action(p) == Stop(S.FAILED)


def test_success_after_failures_clears_the_failure_count() -> None:
    plan = plan_of(StepPlan("A", max_attempts=3), StepPlan("B"))
    p = run_fail(plan, start(plan, saga=False))
    p = run_ok(plan, p)
    assert p.failures == {}
    assert p.next_step == "B"


def test_failure_in_saga_mode_compensates_completed_steps_newest_first() -> None:
    p = start(ABC, saga=True)
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
    p = run_fail(ABC, start(ABC, saga=True))
    assert p.status is S.FAILED_ROLLED_BACK
    assert p.to_compensate == ()
    assert p.compensated == ()


def test_compensation_failure_is_retried_then_recorded() -> None:
    plan = plan_of(
        StepPlan("A", compensable=True),
        StepPlan("B", compensable=True, compensate_max_attempts=2, compensate_retry_delays=(1.0,)),
        StepPlan("C"),
    )
    p = run_ok(plan, run_ok(plan, start(plan, saga=True)))
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
    p = run_interrupt(plan, start(plan, saga=False))
    p = run_interrupt(plan, p)
    assert p.failures == {}
    assert p.interrupts == {"f:A": 2}
    p = run_fail(plan, p)
    assert p.status is S.ACTIVE  # one attempt of two used
    p = begin(p, "A", "forward")
    assert p.inflight is not None
    assert p.inflight.attempt == 4
    p = failed(plan, p, "second failure")
    assert p.status is S.FAILED


def test_interrupted_max_times_compensates_itself_first() -> None:
    plan = plan_of(
        StepPlan("A", compensable=True),
        StepPlan("B", compensable=True, max_interrupts=2),
    )
    p = run_ok(plan, start(plan, saga=True))
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
    p = run_interrupt(plan, start(plan, saga=False))
    assert p.status is S.FAILED
    assert p.to_compensate == ()


def test_interrupted_compensation_gives_up_after_max_interrupts() -> None:
    plan = plan_of(StepPlan("A", compensable=True, max_interrupts=2), StepPlan("B"))
    p = run_fail(plan, run_ok(plan, start(plan, saga=True)))
    assert p.to_compensate == ("A",)
    p = run_interrupt(plan, p)
    assert next_action(p) == Run("A", "compensate", None)
    p = run_interrupt(plan, p)
    assert p.status is S.COMPENSATION_FAILED
    assert p.compensation_failed == ("A",)


def test_cancel_idle_saga_compensates_then_cancelled() -> None:
    p = run_ok(ABC, run_ok(ABC, start(ABC, saga=True)))
    p = cancel(ABC, p, reason="operator")
    assert p.cancelled is True
    assert p.status is S.COMPENSATING
    assert p.to_compensate == ("A",)  # B is not compensable
    assert p.error == "operator"
    p = run_ok(ABC, p)
    assert p.status is S.CANCELLED


def test_cancel_idle_without_saga_is_immediate() -> None:
    p = cancel(ABC, run_ok(ABC, start(ABC, saga=False)))
    assert p.status is S.CANCELLED
    assert p.to_compensate == ()
    assert next_action(p) == Stop(S.CANCELLED)


def test_cancel_of_a_finished_workflow_is_refused() -> None:
    p = run_fail(ABC, start(ABC, saga=False))
    with pytest.raises(ValueError, match="cannot be cancelled"):
        cancel(ABC, p)


def test_cancel_inflight_compensates_the_stopped_step_first() -> None:
    p = run_ok(ABC, start(ABC, saga=True))
    p = run_ok(ABC, p)
    p = begin(p, "C", "forward")
    p = cancel(ABC, p)
    assert p.status is S.ACTIVE  # only the flag: the runner stops the attempt
    assert p.cancelled
    assert p.inflight is not None
    p = cancel_inflight(ABC, p, "stopped")
    assert p.inflight is None
    assert p.status is S.COMPENSATING
    assert p.to_compensate == ("C", "A")
    p = run_ok(ABC, run_ok(ABC, p))
    assert p.status is S.CANCELLED


def test_cancel_inflight_without_saga() -> None:
    p = cancel(ABC, begin(start(ABC, saga=False), "A", "forward"))
    p = cancel_inflight(ABC, p, "stopped")
    assert p.status is S.CANCELLED
    assert p.to_compensate == ()


def test_cancel_while_inflight_then_step_completes_without_saga_compensates_nothing() -> None:
    """Without saga mode a cancel ends in CANCELLED with nothing compensated (DESIGN §4), also when
    the running step (a sync one, which cannot be stopped) completes after the cancel."""
    p = cancel(ABC, begin(start(ABC, saga=False), "A", "forward"))
    p = succeeded(ABC, p)
    assert p.status is S.CANCELLED
    assert p.to_compensate == ()


def test_cancel_while_inflight_then_step_completes_in_saga_compensates_it() -> None:
    p = cancel(ABC, begin(start(ABC, saga=True), "A", "forward"))
    p = succeeded(ABC, p)
    assert p.status is S.COMPENSATING
    assert p.to_compensate == ("A",)
    assert run_ok(ABC, p).status is S.CANCELLED


def test_compensation_during_cancel_rollback_is_retried() -> None:
    """A compensation that raises is retried (DESIGN §5) — also in the rollback of a cancel."""
    plan = plan_of(StepPlan("A", compensable=True, compensate_max_attempts=3), StepPlan("B"))
    p = cancel(plan, run_ok(plan, start(plan, saga=True)))
    assert p.to_compensate == ("A",)
    p = run_fail(plan, p)
    assert p.compensation_failed == ()
    assert next_action(p) == Run("A", "compensate", None)
    p = run_ok(plan, p)
    assert p.status is S.CANCELLED


def test_retry_failed_resumes_at_the_failed_step() -> None:
    plan = plan_of(StepPlan("A"), StepPlan("B", max_attempts=1), StepPlan("C"))
    p = run_fail(plan, run_ok(plan, start(plan, saga=False)))
    assert p.status is S.FAILED
    p = retry(plan, p)
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
    p = run_ok(plan, run_ok(plan, start(plan, saga=True)))
    p = run_fail(plan, p)  # C
    p = run_fail(plan, p)  # undo B
    p = run_fail(plan, p)  # undo A
    assert p.status is S.COMPENSATION_FAILED
    assert p.compensation_failed == ("B", "A")
    p = retry(plan, p)
    assert p.status is S.COMPENSATING
    assert p.to_compensate == ("B", "A")
    assert p.compensation_failed == ()
    p = run_ok(plan, run_ok(plan, p))
    assert p.status is S.FAILED_ROLLED_BACK


@pytest.mark.parametrize("status", [S.COMPLETED, S.FAILED_ROLLED_BACK, S.ACTIVE, S.CANCELLED])
def test_retry_is_refused_for_other_statuses(status: WorkflowStatus) -> None:
    with pytest.raises(ValueError, match="Only FAILED and COMPENSATION_FAILED"):
        retry(ABC, Progress(status=status, next_step="A"))


def test_continues_follows_automate_next() -> None:
    plan = plan_of(StepPlan("A", automate_next=True), StepPlan("B"), StepPlan("C"))
    before = begin(start(plan, saga=False), "A", "forward")
    after = succeeded(plan, before)
    assert continues(plan, before, after) is True
    before = begin(after, "B", "forward")
    after = succeeded(plan, before)
    assert continues(plan, before, after) is False


def test_progress_json_roundtrip_and_unknown_keys() -> None:
    p = begin(run_fail(ABC, run_ok(ABC, start(ABC, saga=True)), now=5.0), "A", "compensate")
    data = p.to_json()
    assert data["status"] == "COMPENSATING"
    assert isinstance(data["completed"], list)
    assert roundtrip(p) == p
    assert Progress.from_json({**data, "added_in_a_later_version": 1}) == p


# ------------------------------------------------------------------------------------------------
# Properties

OUTCOMES = ("ok", "fail", "interrupt")


@st.composite
def plans(draw: st.DrawFn) -> Plan:
    n = draw(st.integers(1, 6))
    return Plan(
        tuple(
            StepPlan(
                name=f"S{i}",
                compensable=draw(st.booleans()),
                max_attempts=draw(st.integers(1, 3)),
                compensate_max_attempts=draw(st.integers(1, 3)),
                max_interrupts=draw(st.integers(1, 3)),
                automate_next=draw(st.booleans()),
                retry_delays=draw(st.lists(st.floats(0, 5), max_size=2).map(tuple)),
            )
            for i in range(n)
        )
    )


def bound(plan: Plan) -> int:
    """Most executions the contract allows: each step and each compensation runs until it
    succeeds, has failed ``max_attempts`` times or has been interrupted ``max_interrupts`` times."""
    return sum(
        (s.max_attempts + s.max_interrupts - 1) + (s.compensate_max_attempts + s.max_interrupts - 1)
        for s in plan.steps
    )


def drive(
    plan: Plan, saga: bool, outcomes: Sequence[str]
) -> tuple[Progress, list[tuple[str, str, str]]]:
    """Run the state machine to a Stop; outcomes beyond the list are successes."""
    p = start(plan, saga=saga)
    it: Iterator[str] = iter(outcomes)
    trace: list[tuple[str, str, str]] = []
    clock = 0.0
    for _ in range(bound(plan) + 1):
        action = next_action(p)
        if isinstance(action, Stop):
            assert action.status is p.status
            return p, trace
        clock = max(clock, action.not_before or 0.0) + 1.0
        p = begin(p, action.step, action.phase)
        assert roundtrip(p) == p
        outcome = next(it, "ok")
        if outcome == "ok":
            p = succeeded(plan, p)
        elif outcome == "fail":
            p = failed(plan, p, f"{action.step} failed", now=clock)
        else:
            p = interrupted(plan, p)
        assert roundtrip(p) == p
        trace.append((action.phase, action.step, outcome))
    raise AssertionError(f"no Stop within {bound(plan)} executions: {trace}")


@settings(max_examples=400, deadline=None)
@given(plan=plans(), saga=st.booleans(), outcomes=st.lists(st.sampled_from(OUTCOMES), max_size=80))
def test_properties(plan: Plan, saga: bool, outcomes: list[str]) -> None:
    p, trace = drive(plan, saga, outcomes)
    names = [s.name for s in plan.steps]
    forward = [(step, outcome) for phase, step, outcome in trace if phase == "forward"]
    comps = [(step, outcome) for phase, step, outcome in trace if phase == "compensate"]
    completed = [step for step, outcome in forward if outcome == "ok"]

    # Forward steps run in plan order, and a completed step never runs again.
    assert completed == names[: len(completed)]
    assert p.completed == tuple(completed)
    for i, (step, outcome) in enumerate(forward):
        if outcome == "ok":
            assert step not in [s for s, _ in forward[i + 1 :]]

    # Per-step execution counts respect retry and max_interrupts.
    for spec in plan.steps:
        runs = [o for s, o in forward if s == spec.name]
        assert runs.count("fail") <= spec.max_attempts
        assert runs.count("interrupt") <= spec.max_interrupts
        undo = [o for s, o in comps if s == spec.name]
        assert undo.count("fail") <= spec.compensate_max_attempts
        assert undo.count("interrupt") <= spec.max_interrupts
        assert undo.count("ok") <= 1

    # Which compensations run, in which order.
    all_done = completed == names
    expected: list[str] = []
    if saga and not all_done:
        last_step, last_outcome = forward[-1]
        if last_outcome == "interrupt" and plan.get(last_step).compensable:
            expected.append(last_step)  # interrupted and given up: it may have taken effect
        expected += [s for s in reversed(completed) if plan.get(s).compensable]
    order = list(dict.fromkeys(step for step, _ in comps))
    assert order == expected
    # each compensation runs to its end before the next one starts
    runs_of = [step for step, _ in comps]
    assert runs_of == sorted(runs_of, key=order.index)
    gave_up = [s for s in order if [o for x, o in comps if x == s][-1] != "ok"]
    assert p.compensated == tuple(s for s in order if s not in gave_up)
    assert p.compensation_failed == tuple(gave_up)
    # compensations only ever after the forward part is over
    if comps:
        first_comp = next(i for i, (phase, _, _) in enumerate(trace) if phase == "compensate")
        assert all(phase == "compensate" for phase, _, _ in trace[first_comp:])

    # Final status.
    assert p.status.is_terminal
    assert p.inflight is None
    assert (p.status is S.COMPLETED) == all_done
    if p.status is S.FAILED:
        assert not saga
    if not saga:
        assert p.status in (S.COMPLETED, S.FAILED)
        assert comps == []
    if p.status in (S.FAILED_ROLLED_BACK, S.COMPENSATION_FAILED):
        assert saga
    if saga and not all_done:
        assert p.status in (S.FAILED_ROLLED_BACK, S.COMPENSATION_FAILED)
        assert p.failed_step == forward[-1][0]
    assert (p.status is S.COMPENSATION_FAILED) == bool(gave_up)
    assert p.journal_seq == len(trace)


@settings(max_examples=200, deadline=None)
@given(
    plan=plans(),
    saga=st.booleans(),
    outcomes=st.lists(st.sampled_from(OUTCOMES), max_size=40),
)
def test_retry_after_failure_never_reruns_completed_steps(
    plan: Plan, saga: bool, outcomes: list[str]
) -> None:
    p, _ = drive(plan, saga, outcomes)
    if p.status not in (S.FAILED, S.COMPENSATION_FAILED):
        return
    completed_before = p.completed
    p = retry(plan, p)
    assert roundtrip(p) == p
    p2, trace2 = drive_from(plan, p)
    for phase, step, _ in trace2:
        if phase == "forward":
            assert step not in completed_before
    assert p2.status.is_terminal


def drive_from(plan: Plan, p: Progress) -> tuple[Progress, list[tuple[str, str, str]]]:
    trace = []
    for _ in range(bound(plan) + 1):
        action = next_action(p)
        if isinstance(action, Stop):
            return p, trace
        p = succeeded(plan, begin(p, action.step, action.phase))
        trace.append((action.phase, action.step, "ok"))
    raise AssertionError("no Stop")
