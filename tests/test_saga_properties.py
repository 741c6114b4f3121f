"""Properties of the saga state machine (agent._saga), driven by hypothesis: random plans, random
step outcomes, cancels and operator retries at random points, and the progress round-tripped
through JSON at every step, as every commit stores it.

Besides where the state machine goes, the events it decides are checked against what the MQTT
contract promises subscribers: every status change has exactly one ``status_changed``, and every
started attempt ends exactly once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import WorkflowStatus
from agent._saga import (
    Change,
    Plan,
    Progress,
    StepPlan,
    Stop,
    begin,
    can_cancel,
    can_retry,
    cancel,
    cancel_inflight,
    failed,
    internal_error,
    interrupted,
    next_action,
    retry,
    start,
    succeeded,
)

S = WorkflowStatus

STARTED = {"step_started": "forward", "compensation_started": "compensate"}
ENDED = {
    "step_completed": "forward",
    "step_failed": "forward",
    "compensation_completed": "compensate",
    "compensation_failed": "compensate",
}


def roundtrip(p: Progress) -> Progress:
    return Progress.from_json(json.loads(json.dumps(p.to_json())))


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
                compensate_retry_delays=draw(st.lists(st.floats(0, 5), max_size=2).map(tuple)),
            )
            for i in range(n)
        )
    )


@dataclass
class Recorder:
    """Applies changes as the runner does, checking each one, and keeps the event stream."""

    progress: Progress
    events: list[dict[str, object]] = field(default_factory=list)
    alerts: list[tuple[str, str | None, str | None]] = field(default_factory=list)
    changes: int = 0  # status changes seen
    begins: int = 0
    caught: str | None = None  # the forward step running or due when the cancel came

    def apply(self, change: Change) -> Progress:
        before, after = self.progress, change.progress
        # What every commit stores must read back as it was.
        assert roundtrip(after) == after
        changed = after.status is not before.status
        assert change.status_changed is changed
        names = [e.name for e in change.events]
        assert names.count("status_changed") == (1 if changed else 0)
        if changed:
            last = change.events[-1]
            assert last.name == "status_changed"
            assert (last.step, last.attempt, last.error) == (
                after.current_step,
                None,
                after.error,
            )
            self.changes += 1
        for e in change.events:
            self.events.append(
                {
                    "event": e.name,
                    "step": e.step,
                    "attempt": e.attempt,
                    "error": e.error,
                    "status": after.status,
                }
            )
        if change.alert is not None:
            self.alerts.append(tuple(change.alert))
        # A cancel is never forgotten, and starts no forward step but the one it caught.
        assert after.cancelled or not before.cancelled
        if after.cancelled and not before.cancelled:
            self.caught = before.inflight.step if before.inflight else before.next_step
        if after.cancelled and names[:1] == ["step_started"]:
            assert change.events[0].step == self.caught
        self.progress = after
        return after


def check_stream(rec: Recorder, plan: Plan) -> None:
    """The contract the events keep, read from the stream alone."""
    events = rec.events
    assert events[0] == {
        "event": "workflow_started",
        "step": plan.first,
        "attempt": None,
        "error": None,
        "status": S.ACTIVE,
    }
    assert [e["event"] for e in events].count("workflow_started") == 1
    # Every status change has exactly one status_changed, carrying the new status (the events
    # of the same transition before it carry the new status too).
    announced = S.ACTIVE
    changed = 0
    for e in events:
        if e["event"] == "status_changed":
            assert e["status"] is not announced
            announced = e["status"]  # type: ignore[assignment]
            changed += 1
    assert changed == rec.changes
    assert announced is rec.progress.status
    # Every started attempt ends exactly once, before the next one starts.
    open_attempt: tuple[str, object, object] | None = None
    seen: set[tuple[str, object, object]] = set()
    numbers: dict[tuple[str, object], int] = {}
    for e in events:
        name = str(e["event"])
        if name in STARTED:
            assert open_attempt is None, f"{e} starts while {open_attempt} runs"
            open_attempt = (STARTED[name], e["step"], e["attempt"])
            assert open_attempt not in seen
            seen.add(open_attempt)
            key = (STARTED[name], e["step"])
            # attempts are numbered 1, 2, 3 … (a completed step or compensation starts over)
            assert e["attempt"] == numbers.get(key, 0) + 1
            numbers[key] = int(e["attempt"])  # type: ignore[call-overload]
        elif name in ENDED:
            assert open_attempt == (ENDED[name], e["step"], e["attempt"]), (e, open_attempt)
            open_attempt = None
            if name.endswith("completed"):
                numbers.pop((ENDED[name], e["step"]), None)
    assert open_attempt is None
    assert len(seen) == rec.begins == rec.progress.journal_seq


OPS = (
    "ok",
    "fail",
    "interrupt",  # the agent died during the attempt; found on recovery
    "crash",  # an exception escaped the runner
    "cancel",  # an operator cancels before the next attempt
    "cancel_ok",  # … while the attempt runs, which then completes
    "cancel_fail",  # … which then fails
    "cancel_interrupt",  # … and the agent dies
    "stop",  # … and the runner stops the attempt
    "retry",  # an operator retries
)


def drive(
    plan: Plan, saga: bool, ops: Sequence[str]
) -> tuple[Recorder, list[tuple[str, str, str]]]:
    """Run the state machine, one op per decision point, until the ops are used up and the
    workflow stops; beyond the list every attempt succeeds and nobody intervenes. Returns the
    recorder (its event stream checked) and the (phase, step, outcome) of every attempt."""
    rec = Recorder(Progress())
    rec.apply(start(plan, saga=saga))
    it: Iterator[str] = iter(ops)
    trace: list[tuple[str, str, str]] = []
    clock = 0.0
    for _ in range(len(ops) + 2 * len(plan.steps) + 2):
        p = rec.progress
        op = next(it, None)
        action = next_action(p)
        if isinstance(action, Stop):
            assert action.status is p.status
            assert p.status.is_terminal
            if op is None:
                check_stream(rec, plan)
                return rec, trace
            if op == "retry" and can_retry(p.status):
                rec.apply(retry(plan, p))
            continue
        assert not p.status.is_terminal
        if op == "retry":
            assert not can_retry(p.status)
            with pytest.raises(ValueError, match="cannot be retried"):
                retry(plan, p)
            continue
        if op == "cancel":
            if can_cancel(p.status):
                rec.apply(cancel(plan, p, reason="operator"))
            else:
                with pytest.raises(ValueError, match="cannot be cancelled"):
                    cancel(plan, p)
            continue
        clock = max(clock, action.not_before or 0.0) + 1.0
        p = rec.apply(begin(p, action.step, action.phase))
        rec.begins += 1
        if op is not None and (op.startswith("cancel_") or op == "stop"):
            if can_cancel(p.status):
                p = rec.apply(cancel(plan, p, reason="operator"))
                assert p.inflight is not None  # only the flag: the attempt runs on
            op = {"cancel_ok": "ok", "cancel_fail": "fail", "cancel_interrupt": "interrupt"}.get(
                str(op), op
            )
        trace.append((action.phase, action.step, op or "ok"))
        if op in (None, "ok"):
            rec.apply(succeeded(plan, p))
        elif op == "fail":
            rec.apply(failed(plan, p, f"{action.step} failed", now=clock))
        elif op == "interrupt":
            rec.apply(interrupted(plan, roundtrip(p)))  # recovery reads what was committed
        elif op == "crash":
            rec.apply(internal_error(p, "internal error: boom"))
        else:
            assert op == "stop"
            rec.apply(cancel_inflight(plan, p, "stopped"))
    raise AssertionError(f"no Stop after {len(ops)} ops: {trace}")


@settings(max_examples=300, deadline=None)
@given(plan=plans(), saga=st.booleans(), ops=st.lists(st.sampled_from(OPS), max_size=40))
def test_event_stream_and_operators(plan: Plan, saga: bool, ops: list[str]) -> None:
    rec, trace = drive(plan, saga, ops)
    p = rec.progress
    names = [s.name for s in plan.steps]

    assert p.status.is_terminal
    assert p.inflight is None
    # Forward steps complete in plan order and a completed step never runs again.
    assert p.completed == tuple(names[: len(p.completed)])
    done = [e["step"] for e in rec.events if e["event"] == "step_completed"]
    assert tuple(done) == p.completed
    # Without saga mode nothing is compensated.
    if not saga:
        assert not [phase for phase, _, _ in trace if phase == "compensate"]
        assert p.status not in (S.COMPENSATING, S.FAILED_ROLLED_BACK, S.COMPENSATION_FAILED)
    # A compensation is only ever given up with an alert; an internal error always alerts.
    gave_up = [e["step"] for e in rec.events if e["event"] == "compensation_failed"]
    comp_alerts = [a for a in rec.alerts if a[0] == "compensation_failed"]
    crashes = ops.count("crash")
    for _, step, _ in comp_alerts:
        assert step in gave_up
    assert len([a for a in rec.alerts if a[0] == "internal_error"]) <= crashes
    if crashes == 0:
        assert set(p.compensation_failed) <= {a[1] for a in comp_alerts}
    # A cancelled workflow never completes, and (no internal error) ends CANCELLED or with a
    # compensation to undo by hand.
    if p.cancelled:
        assert p.status is not S.COMPLETED
        if crashes == 0:
            assert p.status in (S.CANCELLED, S.COMPENSATION_FAILED)
    if p.status is S.COMPLETED:
        assert p.completed == tuple(names)
        assert p.error is None


# ------------------------------------------------------------------------------------------------
# Outcomes only (no operator): where the rollback goes, exactly


OUTCOMES = ("ok", "fail", "interrupt")


def bound(plan: Plan) -> int:
    """Most executions the contract allows: each step and each compensation runs until it
    succeeds, has failed ``max_attempts`` times or has been interrupted ``max_interrupts`` times."""
    return sum(
        (s.max_attempts + s.max_interrupts - 1) + (s.compensate_max_attempts + s.max_interrupts - 1)
        for s in plan.steps
    )


@settings(max_examples=300, deadline=None)
@given(plan=plans(), saga=st.booleans(), outcomes=st.lists(st.sampled_from(OUTCOMES), max_size=80))
def test_outcomes(plan: Plan, saga: bool, outcomes: list[str]) -> None:
    rec, trace = drive(plan, saga, outcomes)
    p = rec.progress
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
    # one alert per compensation given up, naming it
    assert [a[1] for a in rec.alerts] == gave_up
    assert {a[0] for a in rec.alerts} <= {"compensation_failed"}
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
    rec, _ = drive(plan, saga, outcomes)
    p = rec.progress
    if not can_retry(p.status):
        return
    completed_before = p.completed
    p = rec.apply(retry(plan, p))
    for _ in range(bound(plan) + 1):
        action = next_action(p)
        if isinstance(action, Stop):
            break
        if action.phase == "forward":
            assert action.step not in completed_before
        p = rec.apply(begin(p, action.step, action.phase))
        rec.begins += 1
        p = rec.apply(succeeded(plan, p))
    assert p.status.is_terminal
    check_stream(rec, plan)


# ------------------------------------------------------------------------------------------------
# Control flow (issue 13): routes, DECISION, HUMAN_INPUT and PARALLEL, driven through the pure
# transitions with random outcomes; the progress round-trips through JSON at every step.

from agent import _saga as flow  # noqa: E402


@st.composite
def flow_plans(draw: st.DrawFn) -> Plan:
    """A DECISION first, routing to a PARALLEL, a HUMAN_INPUT or a STANDARD step (or END); each
    of those goes on to a last STANDARD step. Branches of one or two STANDARD steps."""

    def std(name: str, **extra: object) -> StepPlan:
        return StepPlan(
            name,
            compensable=draw(st.booleans()),
            max_attempts=draw(st.integers(1, 2)),
            compensate_max_attempts=draw(st.integers(1, 2)),
            max_interrupts=draw(st.integers(1, 2)),
            **extra,  # type: ignore[arg-type]
        )

    left = tuple(f"L{i}" for i in range(draw(st.integers(1, 2))))
    right = tuple(f"R{i}" for i in range(draw(st.integers(1, 2))))
    inner = tuple(std(n) for n in (*left, *right))
    steps = (
        std("A"),
        StepPlan(
            "D",
            kind="DECISION",
            max_attempts=draw(st.integers(1, 2)),
            routes=(("p", "P"), ("h", "H"), ("s", "B"), ("end", "END")),
            default=draw(st.sampled_from([None, "B"])),
        ),
        StepPlan("P", kind="PARALLEL", branches=(left, right), next="Z"),
        StepPlan(
            "H",
            kind="HUMAN_INPUT",
            next="Z",
            on_timeout=draw(st.sampled_from(["fail", "continue"])),
        ),
        std("B"),
        std("Z", pivot=draw(st.booleans())),
    )
    return Plan(steps, inner)


FLOW_OPS = ["ok", "fail", "interrupt", "cancel", "p", "h", "s", "end", "zzz", "none"]


def _step_events(change: Change, started: set[str], undone: list[str]) -> None:
    for e in change.events:
        if e.name == "step_started" and e.step is not None:
            started.add(e.step)
        if e.name == "compensation_completed" and e.step is not None:
            undone.append(e.step)  # (a failed attempt may be retried: see compensation_failed)


@settings(max_examples=400, deadline=None)
@given(plan=flow_plans(), saga=st.booleans(), ops=st.lists(st.sampled_from(FLOW_OPS), max_size=60))
def test_control_flow_compensates_only_what_ran_and_each_once(
    plan: Plan, saga: bool, ops: list[str]
) -> None:
    p = start(plan, saga=saga).progress
    started: set[str] = set()
    undone: list[str] = []
    feed = iter([*ops, *(["ok"] * 200)])
    for _ in range(400):
        op = next(feed)
        action = next_action(p, plan) if p.inflight is None else None
        if action is None:
            fl = p.inflight
            assert fl is not None
            if op == "interrupt":
                change = interrupted(plan, p)
            elif op == "cancel" and fl.phase == "forward" and can_cancel(p.status):
                change = cancel(plan, p)
                p = roundtrip(change.progress)
                change = cancel_inflight(plan, p, "cancelled")
            elif op == "fail":
                change = failed(plan, p, "boom")
            elif fl.phase == "forward" and plan.get(fl.step).kind == "DECISION":
                key = None if op in ("ok", "none") else op
                change = flow.decided(plan, p, key)
            else:
                change = succeeded(plan, p)
        elif isinstance(action, Stop):
            break
        elif isinstance(action, flow.Pause):
            change = flow.pause(plan, p)
            p = roundtrip(change.progress)
            if op == "cancel":
                change = cancel(plan, p)
            elif op == "fail":
                change = flow.pause_timed_out(plan, p, "fail")
            elif op == "zzz":
                change = flow.pause_timed_out(plan, p)
            else:
                change = flow.resume(plan, p)
        elif isinstance(action, flow.Fork):
            ready = flow.branch_actions(plan, p)
            if op == "cancel" and can_cancel(p.status) and not p.cancelled:
                change = cancel(plan, p)
            elif ready and (op in ("ok", "p", "h") or not p.running):
                change = flow.branch_begin(plan, p, ready[0].step)
            elif p.running:
                step = p.running[0].step
                if op == "fail":
                    change = flow.branch_failed(plan, p, step, "boom")
                elif op == "interrupt":
                    change = flow.branch_interrupted(plan, p, step)
                elif op == "zzz" or ((p.cancelled or p.failed_step) and op != "ok"):
                    change = flow.branch_cancelled(plan, p, step, "stopped")
                else:
                    change = flow.branch_succeeded(plan, p, step)
            else:
                raise AssertionError(f"a PARALLEL with nothing to run or record: {p}")
        else:
            change = begin(p, action.step, action.phase)
        _step_events(change, started, undone)
        p = roundtrip(change.progress)
        if p.status is S.PAUSED and op == "end":
            break  # it may wait for a person for ever
    # Never compensate a step that did not start; never one twice.
    assert len(undone) == len(set(undone)), undone
    assert undone == list(p.compensated)
    assert set(undone) | set(p.compensation_failed) <= started
    assert not set(p.compensated) & set(p.compensation_failed)
    for s in undone:
        assert plan.get(s).compensable
    assert p.status.is_terminal or p.status is S.PAUSED, p
    assert p.inflight is None
    assert not p.running
    if p.status in (S.FAILED_ROLLED_BACK, S.CANCELLED) and saga and plan.pivot not in p.completed:
        # every completed compensable step was undone
        assert {s for s in p.completed if plan.get(s).compensable} <= set(p.compensated)
    if p.status is S.COMPLETED:
        assert p.completed[-1] in ("Z", "D", "A") or plan.after(p.completed[-1]) is None
