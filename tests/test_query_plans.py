"""Every statement the store runs finds its rows by an index: ``EXPLAIN QUERY PLAN`` of what
really runs (each statement as SQLite traced it, its parameters filled in) for each hot-path write
and each operator query, on a real database file.

No plan may ``SCAN`` ``instances``, ``journal``, ``outbox``, ``requests`` or ``schedule_fires``
(read every row), nor sort all the rows it found (``USE TEMP B-TREE FOR ORDER BY``), with three
exceptions, all bounded:

- a newest-first list with no filter walks ``instances_created`` from its newest end and stops at
  its ``LIMIT`` (``SCAN ... USING INDEX`` in the plan: the index order is the ORDER BY, so the walk
  reads what it returns; ties of ``created_at`` are sorted by id within their group, ``USE TEMP
  B-TREE FOR RIGHT PART OF ORDER BY``);
- ``count_by_status`` with no status named counts every instance: one pass over the status index
  (``USING COVERING INDEX``: no row is read), the cost of the answer it gives;
- marking the attempts a restart cut short walks the partial index of resumable instances, which
  holds only those (each with the attempt it was in), and each one's journal rows by key range.
"""

from __future__ import annotations

import itertools
import json
import re
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from agent import SQLiteStore, WorkflowStatus
from agent._store import JournalEnd, JournalStart, NewInstance, Transition

S = WorkflowStatus
TABLES = ("instances", "journal", "outbox", "requests", "schedule_fires")
_UNTRACED = re.compile(r"^\s*(BEGIN|COMMIT|ROLLBACK|SAVEPOINT|RELEASE|PRAGMA)\b", re.I)


def transition(
    wid: str,
    status: WorkflowStatus = S.ACTIVE,
    *,
    at: float = 100.0,
    step: str | None = "One",
    journal: tuple[JournalStart | JournalEnd, ...] = (),
    events: int = 1,
) -> Transition:
    """A transition built by hand (no engine), with ``events`` status events."""
    return Transition(
        workflow_id=wid,
        status=status,
        current_step=step,
        error=None,
        state_json=json.dumps({"wid": wid}),
        progress_json=json.dumps({"status": status.value}),
        at=at,
        journal=journal,
        events=[("event", {"event": "status_changed", "status": status.value})] * events,
    )


def new(
    wid: str,
    *,
    workflow_type: str = "Alpha",
    at: float = 100.0,
    request: tuple[str, dict[str, Any]] | None = None,
    **kw: Any,
) -> NewInstance:
    return NewInstance(
        id=wid,
        workflow_type=workflow_type,
        workflow_version="1.0.0",
        definition_hash=f"hash-{workflow_type}",
        definition=json.dumps({"workflow_type": workflow_type}),
        first=transition(wid, at=at, **kw),
        request=request,
    )


def started(seq: int, at: float, step: str = "One") -> JournalStart:
    return JournalStart(seq, step, "forward", 1, at)


async def populate(store: SQLiteStore, count: int = 40) -> None:
    """``count`` workflows of two types, each with a reply, a finished first attempt and a second
    one started; then some of them finish (COMPLETED, FAILED), pause or compensate."""
    for i in range(count):
        wid = f"wf-{i:03d}"
        at = float(i + 1)
        await store.create_instance(
            new(
                wid,
                workflow_type="Alpha" if i % 2 else "Beta",
                at=at,
                request=(f"r-{wid}", {"ok": True, "workflow_id": wid}),
                journal=(started(1, at),),
            )
        )
        ends = (JournalEnd(1, "completed", at + 0.5, None, '{"led":[false,true]}'),)
        status = (S.ACTIVE, S.COMPLETED, S.FAILED, S.PAUSED, S.COMPENSATING)[i % 5]
        journal = ends + ((started(2, at + 0.5, "Two"),) if status is S.ACTIVE else ())
        await store.commit(transition(wid, status, at=at + 0.5, step="Two", journal=journal))


@pytest.fixture
async def traced(tmp_path: Path) -> AsyncIterator[tuple[SQLiteStore, list[str]]]:
    """A populated store whose two connections record every statement they run from now on."""
    statements: list[str] = []
    async with SQLiteStore(tmp_path / "edgesaga.db") as store:
        await populate(store)
        await store.read(lambda c: c.set_trace_callback(statements.append))
        await store.query(lambda c: c.set_trace_callback(statements.append))
        yield store, statements


def plans(db: Path, statements: list[str]) -> dict[str, list[str]]:
    """Each traced statement (but transaction control and pragmas) with its plan's details."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        found = {}
        for sql in statements:
            if _UNTRACED.match(sql):
                continue
            # sqlite3_expanded_sql writes infinities as Inf, which SQL cannot read back.
            text = re.sub(r"\bInf\b", "9e999", sql)
            found[sql] = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {text}")]
        return found
    finally:
        conn.close()


def full_reads(plan: dict[str, list[str]], *, bounded_walk: bool = False) -> list[str]:
    """The plan lines that read a whole table (or sort all they found); with ``bounded_walk``, an
    index walk of a statement with a LIMIT (ordered by the index) is not one."""
    bad = []
    for sql, details in plan.items():
        for detail in details:
            if "USE TEMP B-TREE FOR ORDER BY" in detail:
                bad.append(f"{detail}  <-  {sql}")
            match = re.match(r"SCAN (\w+)(?: AS \w+)?(.*)", detail)
            if match is None:
                continue
            table = _table_of(sql, match.group(1))
            if table not in TABLES:
                continue
            walk = "USING INDEX" in match.group(2) or "USING COVERING INDEX" in match.group(2)
            if walk and "USING INDEX instances_resumable" in match.group(2):
                continue  # it holds the resumable instances only
            if bounded_walk and walk and " LIMIT " in sql:
                continue
            bad.append(f"{detail}  <-  {sql}")
    return bad


def _table_of(sql: str, name: str) -> str:
    """The table a plan's name (a table or its alias in ``sql``) stands for."""
    if name in TABLES:
        return name
    alias = re.search(rf"\b({'|'.join(TABLES)})\s+(?:AS\s+)?{name}\b", sql)
    return alias.group(1) if alias else name


Op = Callable[[SQLiteStore], Awaitable[Any]]


async def _commit_step(store: SQLiteStore) -> None:
    store._keys.clear()  # so the commit looks the instance's number up (the _key SELECT)
    journal = (JournalEnd(2, "completed", 60.0), started(3, 60.0, "Three"))
    await store.commit(transition("wf-000", at=60.0, step="Three", journal=journal, events=2))


async def _commit_finish(store: SQLiteStore) -> None:
    journal = (JournalEnd(2, "completed", 61.0),)
    await store.commit(transition("wf-005", S.COMPLETED, at=61.0, journal=journal))


async def _commit_many(store: SQLiteStore) -> None:
    await store.commit_many(
        [
            transition("wf-010", at=62.0, journal=(JournalEnd(2, "failed", 62.0, "no"),)),
            transition("wf-015", S.FAILED, at=62.0),
        ]
    )


async def _outbox_round(store: SQLiteStore) -> None:
    pending = await store.outbox_pending(limit=5, after_seq=3)
    await store.outbox_ack(item.seq for item in pending)
    await store.outbox_last_seq()


async def _operator_reads(store: SQLiteStore) -> None:
    assert await store.load_instance("wf-007") is not None
    assert await store.journal("wf-007")
    await store.commanded_outputs("wf-007")
    assert (await store.count_by_status(["PAUSED"]))["PAUSED"] == 8


async def _prune(store: SQLiteStore) -> None:
    assert await store.prune(max_finished=3, slice_rows=4)
    assert await store.prune(max_age=10, now=30.0) == []  # the old ones went already
    assert await store.prune_slice(max_finished=0)


async def _recovery(store: SQLiteStore) -> None:
    page = await store.resumable_page(after_n=3, limit=5)
    assert len(page) == 5
    assert await store.mark_interrupted_attempts(at=70.0, error="interrupted") > 0


async def _schedule_fires(store: SQLiteStore) -> None:
    for slot in ("2026-12-01T06:00:00Z", "2026-12-02T06:00:00Z"):
        assert await store.create_instance(
            new(f"wf-fire-{slot}", at=70.0)._replace(fire=("water", slot))
        )
    assert not await store.create_instance(  # an earlier slot: refused by the key's range
        new("wf-fire-early", at=71.0)._replace(fire=("water", "2026-11-30T06:00:00Z"))
    )
    last = await store.last_fires(["water", "never"])
    assert list(last) == ["water"]
    assert last["water"].slot == "2026-12-02T06:00:00Z"
    assert last["water"].status is S.ACTIVE


HOT_PATH: dict[str, Op] = {
    "create_instance with a reply": lambda s: s.create_instance(
        new("wf-new", at=50.0, request=("r-new", {"ok": True, "workflow_id": "wf-new"}))
    ),
    "commit of a step (after the key cache is emptied)": _commit_step,
    "commit that finishes a workflow": _commit_finish,
    "commit_many": _commit_many,
    "add_alert": lambda s: s.add_alert({"alert": "x"}, workflow_id="wf-001"),
    "outbox pending, ack and last seq": _outbox_round,
    "put_request": lambda s: s.put_request("r-x", {"ok": True, "workflow_id": "wf-001"}, "h"),
    "lookup_request": lambda s: s.lookup_request("r-wf-003"),
}
OPERATOR: dict[str, Op] = {
    "load_instance, journal, outputs, count of one status": _operator_reads,
    "prune by count, by age and one slice": _prune,
    "resumable_page and mark_interrupted_attempts": _recovery,
    "schedule fires: recorded, refused, the latest of each": _schedule_fires,
}


@pytest.mark.parametrize("name", [*HOT_PATH, *OPERATOR])
async def test_no_statement_reads_a_whole_table(
    name: str, traced: tuple[SQLiteStore, list[str]]
) -> None:
    store, statements = traced
    await {**HOT_PATH, **OPERATOR}[name](store)
    plan = plans(Path(store.path), statements)
    assert plan, "nothing was traced"
    assert full_reads(plan) == []


LIST_FILTERS = list(
    itertools.product(
        (None, "ACTIVE", ("ACTIVE", "COMPLETED")),  # status
        (None, "Alpha"),  # workflow_type
        (None, 5.0),  # created_after
        (None, 35.0),  # created_before
        (False, True),  # the second page, by the first one's cursor
    )
)


@pytest.mark.parametrize(("status", "wtype", "after", "before", "second"), LIST_FILTERS)
async def test_every_list_filter_walks_an_index_and_stops_at_its_limit(
    traced: tuple[SQLiteStore, list[str]],
    status: Any,
    wtype: str | None,
    after: float | None,
    before: float | None,
    second: bool,
) -> None:
    store, statements = traced
    kw = {"status": status, "workflow_type": wtype, "created_after": after}
    first, cursor = await store.list_page(**kw, created_before=before, limit=2)
    assert len(first) == 2
    assert cursor is not None
    if second:
        statements.clear()
        page, _ = await store.list_page(**kw, created_before=before, limit=2, cursor=cursor)
        assert page
        assert page[0].created_at <= first[-1].created_at
    plan = plans(Path(store.path), statements)
    # one query per status asked for (a type alone: per status, the type index's order)
    lanes = len(S) if wtype and not status else 2 if isinstance(status, tuple) else 1
    assert len(plan) == lanes
    assert full_reads(plan, bounded_walk=True) == []
    if after is not None or before is not None or second or status or wtype:
        assert full_reads(plan) == []  # a filter or a cursor makes it a SEARCH


async def test_count_by_status_is_one_pass_over_the_covering_status_index(
    traced: tuple[SQLiteStore, list[str]],
) -> None:
    store, statements = traced
    counts = await store.count_by_status()
    assert counts == {"ACTIVE": 8, "COMPLETED": 8, "FAILED": 8, "PAUSED": 8, "COMPENSATING": 8}
    (details,) = plans(Path(store.path), statements).values()
    assert details == ["SCAN instances USING COVERING INDEX instances_status_created"]


async def test_the_checker_sees_a_full_scan(traced: tuple[SQLiteStore, list[str]]) -> None:
    """What the tests above rely on: an unindexed query is caught, aliased or not."""
    store, statements = traced
    await store.query(
        lambda c: c.execute("SELECT * FROM outbox o WHERE o.payload = 'x'").fetchall()
    )
    await store.query(lambda c: c.execute("SELECT * FROM requests ORDER BY reply").fetchall())
    bad = full_reads(plans(Path(store.path), statements), bounded_walk=True)
    assert len(bad) == 3, bad  # the outbox scan; the requests scan and its sort
