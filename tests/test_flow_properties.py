"""Properties of control flow through the real engine and a real SQLite file, driven by hypothesis.

Each example is a generated workflow: a random sequence of STANDARD, DECISION (routes to later
steps or END), PARALLEL (2 to 3 branches of 1 to 3 steps) and HUMAN_INPUT steps; steps that fail k times
against a random ``max_attempts``; and random crash points: the process "dies" right after its
n-th commit (the store refuses everything after it and the in-memory workflow is dropped), and a
new builder on a new store recovers from the file, as after a power cut. The cheap in-process
crash; the SIGKILLs are tests/test_flow_crash.py's.

Whatever happens, from what the steps recorded (tests/flows/crashflow/prop_steps.py) and what was
committed (the journal and the outbox's events):

- a compensated step is one that completed (or whose attempt was cut short: it may have taken
  effect), never one that did not run;
- no step is compensated twice;
- compensations run in the reverse order of the completions;
- a rollback that ends FAILED_ROLLED_BACK undid every completed compensable step;
- driving always stops in a terminal status or PAUSED, and the outcome is the one the routes
  and failures call for (a small model of the path, below).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import (
    InstanceRecord,
    JournalEntry,
    OutboxItem,
    SQLiteStore,
    WorkflowBuilder,
    WorkflowStatus,
)
from agent._definition import build_definition
from agent._records import Transition
from agent._saga import can_cancel
from tests.flows.crashflow import prop_steps

pytestmark = pytest.mark.slow  # each example commits to a real SQLite file, with fsync

S = WorkflowStatus
END = "END"
STEPS = "tests.flows.crashflow.prop_steps"
TYPE = "PropFlow"
WID = "prop-1"
MAX_LIVES = 3  # lives per example: at most 2 crashes, fewer than max_interrupts (3) in one step


# ------------------------------------------------------------------------------------------------
# Generated workflows


@dataclass
class Leaf:
    """A STANDARD step (outer or in a branch)."""

    name: str
    compensable: bool
    max_attempts: int
    fails: int  # times it raises before it succeeds
    yields: int = 1  # awaits in each execution (0: it ends before its task first yields; SLOW)
    sync: bool = False  # a plain function, run on a worker thread

    @property
    def gives_up(self) -> bool:
        return self.fails >= self.max_attempts

    def yaml(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "function": f"{STEPS}.step_sync" if self.sync else f"{STEPS}.step",
            "retry": {"max_attempts": self.max_attempts, "initial_delay": 0},
        }
        if self.compensable:
            out["compensate_function"] = f"{STEPS}.undo"
        return out


@dataclass
class Outer:
    """A step of the outer path."""

    kind: str  # STANDARD | DECISION | PARALLEL | HUMAN_INPUT
    name: str
    leaf: Leaf | None = None  # STANDARD
    routes: dict[str, str] = field(default_factory=dict)  # DECISION
    default: str | None = None  # DECISION
    returns: str | None = None  # DECISION: the key its function returns
    branches: list[list[Leaf]] = field(default_factory=list)  # PARALLEL
    next: str | None = None  # STANDARD / PARALLEL / HUMAN_INPUT

    def yaml(self) -> dict[str, Any]:
        if self.kind == "STANDARD":
            assert self.leaf is not None
            out = self.leaf.yaml()
        elif self.kind == "DECISION":
            out = {
                "name": self.name,
                "type": "DECISION",
                "function": f"{STEPS}.decide",
                "routes": dict(self.routes),
                # It returns the same key when tried again: the outcome is the same, and a
                # DECISION after a pivot must have retries.
                "retry": {"max_attempts": 2, "initial_delay": 0},
            }
            if self.default is not None:
                out["default"] = self.default
        elif self.kind == "PARALLEL":
            out = {
                "name": self.name,
                "type": "PARALLEL",
                "branches": [[leaf.yaml() for leaf in branch] for branch in self.branches],
            }
        else:
            out = {
                "name": self.name,
                "type": "HUMAN_INPUT",
                "input_model": "tests.flows.crashflow.models.PropApproval",
            }
        if self.next is not None:
            out["next"] = self.next
        return out

    def leaves(self) -> list[Leaf]:
        if self.leaf is not None:
            return [self.leaf]
        return [leaf for branch in self.branches for leaf in branch]


@dataclass
class Case:
    steps: list[Outer]
    saga: bool
    crashes: list[int]  # commits each life makes before it dies
    cancel_at: int | None = None  # a cancel is requested after this commit (counted over lives)
    cancel_paused: bool = False  # a PAUSED workflow is cancelled instead of resumed
    pivot: str | None = None  # the outer STANDARD step that is the pivot

    def raw(self) -> dict[str, Any]:
        return {
            "workflow_type": TYPE,
            "workflow_version": "1",
            "initial_state_model": "tests.flows.crashflow.models.PropState",
            "saga_mode": self.saga,
            "steps": [
                {**s.yaml(), **({"pivot": True} if s.name == self.pivot else {})}
                for s in self.steps
            ],
        }

    def leaves(self) -> dict[str, Leaf]:
        return {leaf.name: leaf for s in self.steps for leaf in s.leaves()}

    def compensable(self) -> set[str]:
        return {n for n, leaf in self.leaves().items() if leaf.compensable}


@st.composite
def leaves(draw: st.DrawFn, name: str) -> Leaf:
    max_attempts = draw(st.integers(1, 3))
    return Leaf(
        name=name,
        compensable=draw(st.booleans()),
        max_attempts=max_attempts,
        fails=draw(st.sampled_from([0, 0, 0, 1, 2, 3])),
        yields=draw(st.sampled_from([0, 1, 2, 3, prop_steps.SLOW])),
        sync=draw(st.integers(0, 4)) == 0,
    )


def _later(names: list[str], i: int) -> list[str]:
    return [*names[i + 1 :], END]


@st.composite
def cases(draw: st.DrawFn) -> Case:
    n = draw(st.integers(1, 6))
    names = [f"S{i}" for i in range(n)]
    steps: list[Outer] = []
    for i, name in enumerate(names):
        kinds = ["STANDARD", "STANDARD", "PARALLEL", "HUMAN_INPUT"]
        if i + 1 < n:
            kinds += ["DECISION", "DECISION"]
        kind = draw(st.sampled_from(kinds))
        step = Outer(kind=kind, name=name)
        if kind == "STANDARD":
            step.leaf = draw(leaves(name))
        elif kind == "PARALLEL":
            count = draw(st.integers(2, 3))
            step.branches = [
                [draw(leaves(f"{name}b{b}s{k}")) for k in range(draw(st.integers(1, 3)))]
                for b in range(count)
            ]
        elif kind == "DECISION":
            # Route k0 goes to the next step, so every step stays reachable in list order.
            step.routes = {"k0": names[i + 1], "k1": draw(st.sampled_from(_later(names, i)))}
            if draw(st.booleans()):
                step.routes["k2"] = draw(st.sampled_from(_later(names, i)))
            if draw(st.booleans()):
                step.default = draw(st.sampled_from(_later(names, i)))
            step.returns = draw(st.sampled_from([*step.routes, "unknown", None]))
        if kind != "DECISION" and draw(st.integers(0, 4)) == 0:
            step.next = draw(st.sampled_from(_later(names, i)))
        steps.append(step)
    if _unreachable(steps):
        for step in steps:
            step.next = None  # a jump that leaves a step unreachable: validation refuses it
    saga = draw(st.booleans())
    crashes = draw(st.lists(st.integers(1, 15), max_size=MAX_LIVES - 1))
    return Case(steps=steps, saga=saga, crashes=crashes)


def _successors(steps: list[Outer], i: int) -> list[str]:
    step = steps[i]
    if step.kind == "DECISION":
        return [*step.routes.values(), *([step.default] if step.default else [])]
    if step.next is not None:
        return [step.next]
    return [steps[i + 1].name] if i + 1 < len(steps) else [END]


def _unreachable(steps: list[Outer]) -> bool:
    index = {s.name: i for i, s in enumerate(steps)}
    seen, todo = set(), [steps[0].name]
    while todo:
        name = todo.pop()
        if name == END or name in seen:
            continue
        seen.add(name)
        todo.extend(_successors(steps, index[name]))
    return len(seen) != len(steps)


# ------------------------------------------------------------------------------------------------
# The model: which outer steps complete, and how it ends


@dataclass
class Expected:
    path: list[str]  # outer STANDARD and DECISION steps that complete, in order
    parallels: list[str]  # PARALLEL steps whose every branch step completes
    failed: str | None  # the outer step that fails (a PARALLEL for a failing branch step)
    past_pivot: bool = False  # it failed after the pivot completed: FAILED, nothing undone
    retried: list[str] = field(default_factory=list)  # steps after the pivot that failed (retry)

    def status(self, saga: bool) -> WorkflowStatus:
        if self.failed is None:
            return S.COMPLETED
        return S.FAILED_ROLLED_BACK if saga and not self.past_pivot else S.FAILED


def model(case: Case) -> Expected:
    """Where the case goes. A step after the pivot that fails is retried (by the operator, once
    the cause is fixed: see :func:`_retry_past_pivot`) until it completes; a DECISION after it
    that has no route fails for good."""
    index = {s.name: i for i, s in enumerate(case.steps)}
    path: list[str] = []
    parallels: list[str] = []
    retried: list[str] = []
    past = False
    at = case.steps[0].name
    while at != END:
        i = index[at]
        step = case.steps[i]
        if step.kind == "DECISION":
            target = step.routes.get(step.returns) if step.returns is not None else None
            target = target or step.default
            if target is None:
                return Expected(path, parallels, step.name, past, retried)
            path.append(step.name)
            at = target
            continue
        if any(leaf.gives_up for leaf in step.leaves()):
            if not past:
                return Expected(path, parallels, step.name, past, retried)
            retried.append(step.name)
        if step.kind == "STANDARD":
            path.append(step.name)
            past = past or step.name == case.pivot
        elif step.kind == "PARALLEL":
            parallels.append(step.name)
        at = _successors(case.steps, i)[0]
    return Expected(path, parallels, None, False, retried)


# ------------------------------------------------------------------------------------------------
# A store that dies


class Crash(BaseException):
    """The process dies (not an Exception: nothing in the engine may handle it)."""


#: The error a step of prop_steps raises, naming the step.
FAILURE = re.compile(r"RuntimeError: (\S+) fails on purpose")


class MortalStore(SQLiteStore):
    """A real store on the file that dies right after its ``lifetime``-th commit: that commit is
    durable, nothing after it is written, and :class:`prop_steps.World` stops recording. A step's
    failure is spent once a commit records it (the budget the next life starts from)."""

    def __init__(
        self, path: Path, lifetime: int | None, hook: Callable[[], None] | None = None
    ) -> None:
        super().__init__(path)
        self.lifetime = lifetime
        self.commits = 0
        self.hook = hook  # called after each commit that does not end the life

    def _alive(self) -> None:
        if prop_steps.World.dead:
            raise Crash

    def _committed(self, transition: Transition | None = None) -> None:
        for row in () if transition is None else transition.journal:
            failure = FAILURE.match(getattr(row, "error", None) or "")
            if getattr(row, "outcome", None) == "failed" and failure:
                prop_steps.FAILS_COMMITTED[failure[1]] -= 1  # this failure is spent for good
        self.commits += 1
        if self.lifetime is not None and self.commits >= self.lifetime:
            prop_steps.crashed()
            raise Crash
        if self.hook is not None:
            self.hook()

    async def create_instance(self, new: Any) -> bool:
        self._alive()
        created = await super().create_instance(new)
        self._committed()
        return created

    async def commit(self, transition: Transition) -> None:
        self._alive()
        await super().commit(transition)
        self._committed(transition)

    async def add_alert(self, payload: dict[str, Any], workflow_id: str | None = None) -> None:
        self._alive()
        await super().add_alert(payload, workflow_id)
        self._committed()


@dataclass
class Outcome:
    record: InstanceRecord
    journal: list[JournalEntry]
    outbox: list[OutboxItem]
    stops: list[WorkflowStatus]  # the status each life (or resume) stopped in
    lives: int
    cancel_requested: bool = False  # a cancel reached the workflow while it could be cancelled


async def _life(
    case: Case, db: Path, lifetime: int | None, first: bool, seen: dict[str, int]
) -> list[S]:
    """One process: create (the first) or recover, then resume what is PAUSED (with the input
    model's defaults overridden) or cancel it, until it ends or dies. ``seen`` counts the
    commits of every life and whether a cancel was requested."""
    definition = build_definition(case.raw(), source="<generated>")
    builder = WorkflowBuilder()
    builder.add_definition(definition)

    def after_commit() -> None:
        seen["commits"] += 1
        live = builder.live(WID)
        if seen["commits"] == case.cancel_at and live is not None and can_cancel(live.status):
            live.request_cancel()
            seen["cancel"] = 1

    try:
        return await _lived(case, db, lifetime, first, builder, after_commit, seen)
    except Crash:
        await prop_steps.sync_steps_returned()
        raise


async def _lived(
    case: Case,
    db: Path,
    lifetime: int | None,
    first: bool,
    builder: WorkflowBuilder,
    after_commit: Callable[[], None],
    seen: dict[str, int],
) -> list[S]:
    """The body of :func:`_life`: the statuses each drive stopped in."""
    stops: list[S] = []
    async with MortalStore(db, lifetime, after_commit) as store:
        if first:
            wf = await builder.create_workflow(TYPE, {}, store=store, workflow_id=WID)
            await wf.run()
        else:
            await builder.recover(store)
            wf = await builder.load_workflow(WID, store)
        stops.append(wf.status)
        for _ in range(len(case.steps) + len(case.leaves()) + 1):
            if wf.status is S.PAUSED and case.cancel_paused:
                seen["cancel"] = 1
                wf = await builder.cancel(WID, store)
                await wf.wait()
            elif wf.status is S.PAUSED:
                wf = await builder.resume(store, WID, {"approved": True})
                await wf.run()
            elif _failed_past_pivot(case, wf):
                # The operator fixes the cause (the step's failures go) and retries it.
                outer = next(s for s in case.steps if s.name == wf.progress.failed_step)
                prop_steps.fixed([leaf.name for leaf in outer.leaves()])
                wf = await builder.retry(WID, store)
            else:
                break
            stops.append(wf.status)
    return stops


def _failed_past_pivot(case: Case, wf: Any) -> bool:
    """FAILED at a step after the pivot that a retry can get past (not a DECISION without a
    route: asked again, it gives the same answer)."""
    failed = wf.progress.failed_step
    retriable = {s.name for s in case.steps if s.kind != "DECISION"}
    return case.pivot is not None and wf.status is S.FAILED and failed in retriable


async def _read(db: Path) -> tuple[InstanceRecord, list[JournalEntry], list[OutboxItem]]:
    async with SQLiteStore(db, readonly=True) as store:
        record = await store.load_instance(WID)
        assert record is not None
        return record, await store.journal(WID), await store.outbox_pending(limit=100_000)


@contextlib.contextmanager
def _dead_threads_ignored() -> Iterator[None]:
    """A worker thread of a dead life that hands its result to that life's closed loop raises
    "Event loop is closed": a real crash takes the thread with it, so that error is not one."""
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if isinstance(args.exc_value, RuntimeError) and "loop is closed" in str(args.exc_value):
            return
        previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


def drive(case: Case, db: Path) -> Outcome:
    """Run the case to its end through its crashes, one ``asyncio.run`` per life (so whatever
    the dead process left running goes with its loop)."""
    with _dead_threads_ignored():
        return _drive(case, db)


def _drive(case: Case, db: Path) -> Outcome:
    prop_steps.reset(
        {n: leaf.fails for n, leaf in case.leaves().items() if leaf.fails},
        {s.name: s.returns for s in case.steps if s.kind == "DECISION"},
        {n: leaf.yields for n, leaf in case.leaves().items()},
    )
    stops: list[S] = []
    lives = 0
    seen = {"commits": 0, "cancel": 0}
    while True:
        lifetime = case.crashes[lives] if lives < len(case.crashes) else None
        if lives:
            prop_steps.reborn()
        try:
            stops += asyncio.run(_life(case, db, lifetime, lives == 0, seen))
            break
        except Crash:
            lives += 1
        assert lives <= MAX_LIVES
    record, journal, outbox = asyncio.run(_read(db))
    return Outcome(record, journal, outbox, stops, lives, bool(seen["cancel"]))


# ------------------------------------------------------------------------------------------------
# The properties


def events(outcome: Outcome, name: str) -> list[str]:
    return [
        item.payload["step"]
        for item in outcome.outbox
        if item.kind == "event" and item.payload.get("event") == name
    ]


def check(case: Case, outcome: Outcome) -> None:
    """Every property: the invariants, and the model's outcome."""
    completed = check_invariants(case, outcome)
    check_model(case, outcome, completed)


def check_invariants(case: Case, outcome: Outcome) -> list[str]:
    """What holds whatever happened (crashes, cancels); returns the completed steps (of the
    outer path's STANDARD steps and the branches), in completion order."""
    ledger = prop_steps.LEDGER
    leaves = case.leaves()
    completed = [s for s in events(outcome, "step_completed") if s in leaves]
    undone = [s for what, s in ledger if what == "undo"]
    ran = {s for what, s in ledger if what == "run"}
    # Attempts cut short (by a crash, or a cancel when a sibling branch failed) may have taken
    # effect: their own compensation may run, as after a crash (DESIGN §5).
    cut_short = {
        e.step
        for e in outcome.journal
        if e.phase == "forward" and e.outcome in ("interrupted", "cancelled")
    }

    # Driving stops in a terminal status or PAUSED, never half-way.
    for stop in outcome.stops:
        assert stop.is_terminal or stop is S.PAUSED, (stop, outcome.stops)
    status = outcome.record.status
    assert status.is_terminal, status

    # Never twice, never one that did not run, never one that did not complete (unless cut short).
    assert not [s for s, n in Counter(undone).items() if n > 1], undone
    assert Counter(events(outcome, "compensation_completed")) == Counter(undone)
    assert set(undone) <= ran, (undone, ran)
    assert set(undone) <= set(completed) | cut_short, (undone, completed, cut_short)
    assert set(undone) <= case.compensable()
    assert len(completed) == len(set(completed)), completed  # a completed step never runs again

    # Newest completion first (an interrupted step's own compensation may come before them).
    done_undone = [s for s in undone if s in completed]
    assert done_undone == [s for s in reversed(completed) if s in set(done_undone)], (
        undone,
        completed,
    )

    if status is S.COMPLETED or not case.saga:
        assert undone == []
    if case.saga and status in (S.FAILED_ROLLED_BACK, S.CANCELLED):
        assert set(undone) >= set(completed) & case.compensable(), (undone, completed)
    return completed


def check_model(case: Case, outcome: Outcome, completed: list[str]) -> None:
    """The end the routes and failures call for (no cancel came)."""
    status = outcome.record.status
    expected = model(case)
    assert status is expected.status(case.saga), (status, expected, outcome.record.error)
    outer_done = [
        s
        for s in events(outcome, "step_completed")
        if s in {o.name for o in case.steps if o.kind in ("STANDARD", "DECISION")}
    ]
    assert outer_done == expected.path, (outer_done, expected)
    for name in expected.parallels:
        branch_steps = {leaf.name for leaf in case.steps[int(name[1:])].leaves()}
        assert branch_steps <= set(completed), (name, completed)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(cases())
def test_generated_workflows_recover_and_compensate_exactly_what_completed(case: Case) -> None:
    with tempfile.TemporaryDirectory(prefix="edgesaga-prop-") as tmp:
        outcome = drive(case, Path(tmp) / "agent.db")
        check(case, outcome)


def _closure(steps: list[Outer], start: str) -> set[str]:
    """The steps that can run after ``start`` (not itself)."""
    index = {s.name: i for i, s in enumerate(steps)}
    seen: set[str] = set()
    todo = list(_successors(steps, index[start]))
    while todo:
        name = todo.pop()
        if name == END or name in seen:
            continue
        seen.add(name)
        todo.extend(_successors(steps, index[name]))
    return seen


@st.composite
def pivoted_cases(draw: st.DrawFn) -> Case:
    """A case in saga mode with one outer STANDARD step as the pivot, and the steps around it
    made to fit the pivot rules: undoable before it, retried and not undoable after it."""
    case = draw(cases().filter(lambda c: any(s.kind == "STANDARD" for s in c.steps)))
    pivot = draw(st.sampled_from([s.name for s in case.steps if s.kind == "STANDARD"]))
    case.pivot, case.saga = pivot, True
    after = _closure(case.steps, pivot)
    before = {s.name for s in case.steps if pivot in _closure(case.steps, s.name)}
    for step in case.steps:
        for leaf in step.leaves():
            if step.name in before:
                leaf.compensable = True
            elif step.name in after:
                leaf.compensable = False
                leaf.max_attempts = max(leaf.max_attempts, 2)
    return case


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(pivoted_cases())
def test_generated_workflows_with_a_pivot_never_undo_past_it(case: Case) -> None:
    with tempfile.TemporaryDirectory(prefix="edgesaga-prop-") as tmp:
        outcome = drive(case, Path(tmp) / "agent.db")
    check(case, outcome)
    completed = events(outcome, "step_completed")
    undone = [s for what, s in prop_steps.LEDGER if what == "undo"]
    if case.pivot in completed:
        assert undone == [], (case.pivot, undone)
    expected = model(case)
    alerts = [i.payload for i in outcome.outbox if i.kind == "alert"]
    if expected.retried or expected.past_pivot:
        # Each failure after the pivot is alerted, naming the pivot.
        assert alerts, outcome.record.error
        assert all(case.pivot in a["message"] for a in alerts), alerts
    else:
        assert alerts == []


@st.composite
def cancelled_cases(draw: st.DrawFn) -> Case:
    case = draw(cases())
    case.cancel_at = draw(st.integers(1, 20))
    case.cancel_paused = draw(st.booleans())
    return case


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(cancelled_cases())
def test_generated_workflows_cancelled_at_random_points_undo_only_what_completed(
    case: Case,
) -> None:
    with tempfile.TemporaryDirectory(prefix="edgesaga-prop-") as tmp:
        outcome = drive(case, Path(tmp) / "agent.db")
    completed = check_invariants(case, outcome)
    status = outcome.record.status
    if outcome.cancel_requested:
        # A cancel that came in time ends CANCELLED, else the run ended on its own first.
        assert status in (S.CANCELLED, S.COMPLETED, S.FAILED, S.FAILED_ROLLED_BACK), status
    else:
        check_model(case, outcome, completed)
    if case.cancel_paused and S.PAUSED in outcome.stops:
        assert status is S.CANCELLED, (status, outcome.stops)


def test_the_model_follows_a_route_past_a_failing_step() -> None:
    """The model the property compares with: a DECISION that skips a failing step completes."""
    fail = Leaf("S1", compensable=True, max_attempts=1, fails=1)
    case = Case(
        steps=[
            Outer("DECISION", "S0", routes={"k0": "S1", "k1": "S2"}, returns="k1"),
            Outer("STANDARD", "S1", leaf=fail),
            Outer("STANDARD", "S2", leaf=Leaf("S2", True, 1, 0)),
        ],
        saga=True,
        crashes=[3],
    )
    assert model(case) == Expected(["S0", "S2"], [], None)
    with tempfile.TemporaryDirectory(prefix="edgesaga-prop-") as tmp:
        outcome = drive(case, Path(tmp) / "agent.db")
    check(case, outcome)
    assert outcome.lives == 1
    assert ("run", "S1") not in prop_steps.LEDGER


def test_a_cancel_that_meets_a_failing_branch_still_rolls_back() -> None:
    """A cancel requested while a PARALLEL runs, seen only after a branch failed for good (the
    rollback already begun), must not stop the rollback: found by the cancel property."""
    for cancel_at in (2, 3):  # after the branches' start, after A's completion
        case = Case(
            steps=[
                Outer(
                    "PARALLEL",
                    "S0",
                    branches=[[Leaf("A", True, 1, 0, 0)], [Leaf("B", True, 1, 1, 0)]],
                )
            ],
            saga=True,
            crashes=[],
            cancel_at=cancel_at,
        )
        with tempfile.TemporaryDirectory(prefix="edgesaga-prop-") as tmp:
            outcome = drive(case, Path(tmp) / "agent.db")
        assert outcome.cancel_requested
        status = outcome.record.status
        assert status in (S.CANCELLED, S.FAILED_ROLLED_BACK), (cancel_at, outcome.record.error)
        assert [s for what, s in prop_steps.LEDGER if what == "undo"] == ["A"]
        assert not [i for i in outcome.outbox if i.kind == "alert"], outcome.record.error
        check_invariants(case, outcome)
