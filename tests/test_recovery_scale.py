"""Recovery of thousands of unfinished workflows: every one resumed, oldest first, each cut attempt
run once more at most, and the number of workflow objects in memory bounded whatever their number.

The database is a real SQLite file filled fast: two real workflows are made by the engine (one
with its first attempt begun, as a power cut in the middle of a step leaves it, one not), and
their instance and journal rows are copied with ``INSERT ... SELECT`` under new ids. The steps
append ``<workflow id> <step> <attempt>`` to a ledger file, the side effect the tests count.
"""

from __future__ import annotations

import asyncio
import collections
import sqlite3
import sys
import weakref
from pathlib import Path
from typing import Any

import pytest

from agent import SQLiteStore, WorkflowBuilder
from agent._engine import Workflow
from agent._recovery import Feeder, mark_interrupted_attempts
from agent._runner import Runner
from agent._schema import JOURNAL_SPAN
from tests.flows.service.harness import agent_process, poll, write_config

#: The steps: each notes its run in the ledger; with a ``gate`` file named in the state, waits for
#: that file to exist first (bounded), so a test can hold every workflow before its first step.
_STEPS = """
import asyncio, os
from pydantic import BaseModel

class LedgerState(BaseModel):
    ledger: str
    gate: str | None = None

async def note(state, context):
    if state.gate is not None:
        for _ in range(3000):
            if os.path.exists(state.gate):
                break
            await asyncio.sleep(0.01)
    with open(state.ledger, "a", encoding="utf-8") as fh:
        fh.write(f"{context.workflow_id} {context.step_name} {context.attempt}\\n")
    return {}
"""

# max_interrupts 2: an interruption counted twice (the store's pass and the engine) would make
# the step give up and the workflow end FAILED instead of COMPLETED.
_DEFINITION = """
workflow_type: Ledgered
workflow_version: "1.0.0"
initial_state_model: ledger_steps.LedgerState
steps:
  - {name: First, function: ledger_steps.note, automate_next: true, max_interrupts: 2}
  - {name: Second, function: ledger_steps.note}
"""


@pytest.fixture
def defs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The Ledgered definition and its steps module, importable in this process (and, beside the
    definition, in an agent's)."""
    directory = tmp_path / "defs"
    directory.mkdir()
    (directory / "ledger_steps.py").write_text(_STEPS)
    (directory / "ledgered.yaml").write_text(_DEFINITION)
    monkeypatch.syspath_prepend(str(directory))
    monkeypatch.delitem(sys.modules, "ledger_steps", raising=False)
    return directory


def wid(i: int) -> str:
    """The id of the ``i``-th workflow made by :func:`_fill` (ids sort in creation order)."""
    return f"00000000-0000-4000-8000-{i:012d}"


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]


async def _fill(
    database: Path, defs: Path, state: dict[str, Any], *, count: int, begun_every: int = 3
) -> set[str]:
    """``count`` ACTIVE workflows of type Ledgered, created in the order of their ids; every
    ``begun_every``-th has its first attempt recorded as started and never ended. Returns the ids
    of those."""
    async with SQLiteStore(database) as store:
        builder = WorkflowBuilder(definitions=[defs])
        begun = await builder.create_workflow("Ledgered", state, store=store, begin=True)
        fresh = await builder.create_workflow("Ledgered", state, store=store, begin=False)
    conn = sqlite3.connect(database)
    try:
        cols = [c for c in _columns(conn, "instances") if c not in ("n", "id", "created_at")]
        listed = ", ".join(cols)
        picked = ", ".join(f"t.{c}" for c in cols)
        with conn:
            conn.execute(
                f"""WITH RECURSIVE x(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM x WHERE i < ?)
                INSERT INTO instances (id, created_at, {listed})
                SELECT printf('00000000-0000-4000-8000-%012d', x.i), t.created_at + x.i * 1e-6,
                       {picked}
                FROM x JOIN instances t
                  ON t.id = CASE WHEN x.i % ? = 0 THEN ? ELSE ? END
                ORDER BY x.i""",
                (count, begun_every, begun.id, fresh.id),
            )
            jcols = [c for c in _columns(conn, "journal") if c not in ("k", "n")]
            conn.execute(
                f"""INSERT INTO journal (k, n, {", ".join(jcols)})
                SELECT i.n * {JOURNAL_SPAN} + j.seq, i.n, {", ".join(f"j.{c}" for c in jcols)}
                FROM instances i JOIN instances t ON t.id = ?
                JOIN journal j ON j.n = t.n
                WHERE i.id LIKE '00000000-0000-4000-8000-%' AND i.progress = t.progress""",
                (begun.id,),
            )
            for template in (begun.id, fresh.id):  # only the copies stay
                n = conn.execute("SELECT n FROM instances WHERE id=?", (template,)).fetchone()[0]
                conn.execute("DELETE FROM journal WHERE n=?", (n,))
                conn.execute("DELETE FROM outbox WHERE workflow_id=?", (template,))
                conn.execute("DELETE FROM instances WHERE n=?", (n,))
    finally:
        conn.close()
    return {wid(i) for i in range(1, count + 1) if i % begun_every == 0}


def _statuses(database: Path) -> collections.Counter[str]:
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        return collections.Counter(r[0] for r in conn.execute("SELECT status FROM instances"))
    finally:
        conn.close()


def _journal_outcomes(database: Path) -> dict[str, list[tuple[str, int, str]]]:
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT i.id, j.step, j.attempt, j.outcome FROM journal j "
            "JOIN instances i ON i.n = j.n ORDER BY i.n, j.seq"
        ).fetchall()
    finally:
        conn.close()
    out: dict[str, list[tuple[str, int, str]]] = collections.defaultdict(list)
    for workflow_id, step, attempt, outcome in rows:
        out[workflow_id].append((step, attempt, outcome))
    return out


def _ledger(path: Path) -> list[tuple[str, str, int]]:
    if not path.exists():
        return []
    lines = [line.split() for line in path.read_text().splitlines() if line.strip()]
    return [(w, s, int(a)) for w, s, a in lines]


async def test_thousands_resume_oldest_first_each_once_with_a_bounded_number_in_memory(
    tmp_path: Path, defs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    count, page, concurrent = 3000, 64, 8
    ledger = tmp_path / "ledger"
    db = tmp_path / "db"
    cut = await _fill(db, defs, {"ledger": str(ledger)}, count=count)

    builder = WorkflowBuilder(definitions=[defs])
    alive: weakref.WeakSet[Workflow] = weakref.WeakSet()
    peak = {"alive": 0, "live": 0}
    rebuild = builder._from_record

    def counted(rec: Any, store: SQLiteStore) -> Workflow:
        wf = rebuild(rec, store)
        alive.add(wf)
        peak["alive"] = max(peak["alive"], len(alive))
        peak["live"] = max(peak["live"], len(builder._live))
        return wf

    monkeypatch.setattr(builder, "_from_record", counted)
    runner = Runner(max_concurrent=concurrent)
    async with SQLiteStore(db) as store:
        # Before READY: one pass, whatever the number.
        assert await mark_interrupted_attempts(store) == len(cut)
        serving = asyncio.create_task(runner.serve())
        feeder = Feeder(builder, store, runner, backlog=count, page_size=page)
        feeding = asyncio.create_task(feeder.run())
        # A start arriving during the feed (as Control makes it): driven once, not resumed again.
        await feeder.first_page.wait()
        late = await builder.create_workflow(
            "Ledgered", {"ledger": str(ledger)}, store=store, begin=True
        )
        runner.submit(late)
        assert await asyncio.wait_for(feeding, 120) == count
        await asyncio.wait_for(runner.wait_idle(), 120)
        await runner.stop(0)
        await asyncio.wait_for(serving, 10)
    del late

    assert _statuses(db) == {"COMPLETED": count + 1}
    entries = _ledger(ledger)
    runs = collections.Counter((w, s) for w, s, _ in entries)
    expected = [wid(i) for i in range(1, count + 1)]
    # Every step of every workflow ran, and exactly once (none of the cut attempts had run).
    assert set(runs.values()) == {1}
    assert {w for w, _ in runs} == {*expected, feeder_late_id(entries, expected)}
    journals = _journal_outcomes(db)
    for workflow_id in expected:
        steps = journals[workflow_id]
        if workflow_id in cut:  # one interrupted row (the store's pass), then attempt 2
            assert steps == [("First", 1, "interrupted"), ("First", 2, "completed"),
                             ("Second", 1, "completed")], workflow_id  # fmt: skip
        else:
            assert steps == [("First", 1, "completed"), ("Second", 1, "completed")], workflow_id
    # Oldest first: each workflow's first step ran within the runner's concurrency of its turn.
    first_seen = list(dict.fromkeys(w for w, _, _ in entries if w in set(expected)))
    position = {w: k for k, w in enumerate(first_seen)}
    assert max(abs(position[w] - k) for k, w in enumerate(expected)) <= concurrent
    # Memory: the workflows in memory at once stay within a few pages, far below their number.
    bound = 3 * page + concurrent
    assert peak["alive"] <= bound, peak
    assert peak["live"] <= bound, peak


def feeder_late_id(entries: list[tuple[str, str, int]], made: list[str]) -> str:
    """The one id in the ledger that recovery did not make: the workflow started during the feed."""
    others = {w for w, _, _ in entries} - set(made)
    assert len(others) == 1, others
    return others.pop()


async def test_recover_drives_every_page_to_its_end_for_the_cli(tmp_path: Path, defs: Path) -> None:
    """``edgesaga recover`` (``builder.recover(store)``): more workflows than a page, every one
    driven to its end before it returns, the cut attempts counted once."""
    ledger = tmp_path / "ledger"
    db = tmp_path / "db"
    cut = await _fill(db, defs, {"ledger": str(ledger)}, count=600)
    async with SQLiteStore(db) as store:
        recovered = await WorkflowBuilder(definitions=[defs]).recover(store)
    assert [wf.id for wf in recovered] == [wid(i) for i in range(1, 601)]
    assert {wf.status.value for wf in recovered} == {"COMPLETED"}
    runs = collections.Counter((w, s) for w, s, _ in _ledger(ledger))
    assert len(runs) == 1200
    assert set(runs.values()) == {1}
    journals = _journal_outcomes(db)
    assert all(journals[w][0] == ("First", 1, "interrupted") for w in cut)
    assert sum(o == "interrupted" for j in journals.values() for _, _, o in j) == len(cut)


async def test_a_workflow_a_command_finished_while_its_page_was_read_is_not_run_again(
    tmp_path: Path, defs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page's records are read once; a command that finishes with one of them between that read
    and the feed (a cancel, here by another builder on the same store) wins: the stale record is
    not run."""
    ledger = tmp_path / "ledger"
    db = tmp_path / "db"
    cut = await _fill(db, defs, {"ledger": str(ledger)}, count=10)
    assert wid(3) in cut
    async with SQLiteStore(db) as store:
        read_page = store.resumable_page
        raced: list[str] = []

        async def page_then_cancel(**kwargs: Any) -> Any:
            page = await read_page(**kwargs)
            if page and not raced:
                for i in (1, 3):  # one not begun, one with a cut attempt
                    raced.append(wid(i))
                    await WorkflowBuilder(definitions=[defs]).cancel(wid(i), store)
            return page

        monkeypatch.setattr(store, "resumable_page", page_then_cancel)
        recovered = await WorkflowBuilder(definitions=[defs]).recover(store)
    assert [wf.id for wf in recovered] == [wid(i) for i in (2, *range(4, 11))]
    assert _statuses(db) == {"COMPLETED": 8, "CANCELLED": 2}
    assert {w for w, _, _ in _ledger(ledger)} == {wid(i) for i in (2, *range(4, 11))}


def test_the_agent_is_ready_before_recovery_and_a_kill_during_the_feed_loses_nothing(
    tmp_path: Path, defs: Path
) -> None:
    count = 1500
    # A workflow whose fill-time cut attempt is cut again by the kill has two interruptions: its
    # step must still be allowed to run again.
    (defs / "ledgered.yaml").write_text(
        _DEFINITION.replace("max_interrupts: 2", "max_interrupts: 3")
    )
    ledger = tmp_path / "ledger"
    gate = tmp_path / "gate"
    config = write_config(
        tmp_path, definitions=[str(defs)], hardware=None, max_concurrent=32, grace_period=0
    )
    db = tmp_path / "state" / "edgesaga.db"
    db.parent.mkdir()
    cut = asyncio.run(_fill(db, defs, {"ledger": str(ledger), "gate": str(gate)}, count=count))

    with agent_process(config) as agent:
        agent.wait_ready()
        # READY came first: every recovered workflow waits at its gate, none has completed.
        assert _ledger(ledger) == []
        assert _statuses(db) == {"ACTIVE": count}
        gate.touch()
        poll(lambda: len(_ledger(ledger)), lambda n: n >= count // 3, within=60, what="progress")
        agent.proc.kill()  # SIGKILL while the feed is under way
        agent.proc.wait(timeout=10)
    assert _statuses(db)["COMPLETED"] < count

    with agent_process(config, log_name="agent2.log") as agent:
        agent.wait_ready()
        poll(
            lambda: _statuses(db),
            lambda s: s == {"COMPLETED": count},
            within=90,
            what="every workflow to complete after the restart",
        )
        agent.terminate()
        assert agent.wait_exit(10) == 0

    runs = collections.Counter((w, s) for w, s, _ in _ledger(ledger))
    journals = _journal_outcomes(db)
    assert {w for w, _ in runs} == {wid(i) for i in range(1, count + 1)}
    for (workflow_id, step), ran in runs.items():
        interrupted = sum(
            1 for s, _, o in journals[workflow_id] if s == step and o == "interrupted"
        )
        # A step ran, once, plus once more only if the kill cut an attempt of it short (and it
        # had written its ledger line before): never twice for one attempt.
        assert ran >= 1, (workflow_id, step)
        extra = ran - 1
        assert extra <= min(interrupted, 1), (workflow_id, step, journals[workflow_id])
    assert all(journals[w][0] == ("First", 1, "interrupted") for w in cut)
