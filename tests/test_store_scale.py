"""The store at a year of history: prune in small writes with commits in between, the space given
back to the file system, operator reads on a connection of their own, the paged list, the
streaming recovery reads and the migration to schema 5. Real SQLite files in ``tmp_path``."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from _engine_fixtures import step, write_definition
from test_query_plans import new, populate, started, transition

from agent import MemoryStore, SQLiteStore, WorkflowBuilder, WorkflowStatus, _schema
from agent._errors import DiskFull
from agent._status import RESUMABLE
from agent._store import _MIGRATIONS, JOURNAL_SPAN, SCHEMA_VERSION, JournalEnd

S = WorkflowStatus


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "edgesaga.db"


@pytest.fixture
async def store(db: Path) -> AsyncIterator[SQLiteStore]:
    async with SQLiteStore(db) as s:
        yield s


def rows(db: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def wal_size(db: Path) -> int:
    return os.path.getsize(f"{db}-wal")


def file_size(db: Path) -> int:
    wal = Path(f"{db}-wal")
    return os.path.getsize(db) + (wal_size(db) if wal.exists() else 0)


# ------------------------------------------------------------------------------------------------
# Schema 5


def test_the_resumable_index_names_the_statuses_recovery_resumes() -> None:
    listed = {s.strip("'") for s in _schema.RESUMABLE_SQL.strip("()").split(",")}
    assert listed == {s.value for s in RESUMABLE}


async def test_a_new_database_gives_freed_pages_back(store: SQLiteStore) -> None:
    assert (await store.pragmas())["auto_vacuum"] == _schema.AUTO_VACUUM_INCREMENTAL


def _version_4_database(db: Path) -> None:
    """A database as the release before schema 5 left it: no auto-vacuum, one reply stored."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA page_size = 1024")
    conn.execute("PRAGMA journal_mode = WAL")
    for version in range(1, 5):
        for statement in _MIGRATIONS[version].split(";"):
            if statement.strip():
                conn.execute(statement)
    conn.execute("PRAGMA user_version = 4")
    conn.execute("INSERT INTO definitions VALUES ('h', 'Old', '1', '{}')")
    conn.execute(
        "INSERT INTO instances(n, id, workflow_type, definition_hash, status, state, progress, "
        "created_at, updated_at, finished_at) VALUES (1, 'wf-old', 'Old', 'h', 'COMPLETED', '{}', "
        "'{}', 1.0, 2.0, 2.0)"
    )
    conn.executemany(
        "INSERT INTO outbox(seq, kind, workflow_id, payload) VALUES (?, ?, ?, '{}')",
        [(1, "event", "wf-old"), (2, "alert", None), (3, "alert", "wf-gone")],
    )
    conn.execute(
        "INSERT INTO requests(request_id, reply, created_at) VALUES "
        """('r-old', '{"ok":true,"workflow_id":"wf-old"}', strftime('%s', 'now')), """
        """('r-none', '{"ok":true}', strftime('%s', 'now'))"""
    )
    conn.close()


async def test_a_small_version_4_database_is_migrated_and_converted(db: Path) -> None:
    _version_4_database(db)
    assert rows(db, "PRAGMA auto_vacuum") == [(0,)]
    async with SQLiteStore(db) as store:
        pragmas = await store.pragmas()
        assert (pragmas["user_version"], pragmas["auto_vacuum"]) == (SCHEMA_VERSION, 2)
        assert pragmas["page_size"] == 1024
    # the replies know their workflow, and the events its number, so a prune finds them by it
    assert rows(db, "SELECT seq, n FROM outbox ORDER BY seq") == [(1, 1), (2, None), (3, None)]
    assert rows(db, "SELECT request_id, workflow_id FROM requests ORDER BY 1") == [
        ("r-none", None),
        ("r-old", "wf-old"),
    ]
    async with SQLiteStore(db) as store:
        assert await store.prune(max_finished=0) == ["wf-old"]
        assert await store.get_request("r-old") is None
        assert await store.get_request("r-none") == {"ok": True}
        assert [item.seq for item in await store.outbox_pending()] == [2, 3]


async def test_a_large_old_database_is_left_as_it_is_and_says_so(
    db: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _version_4_database(db)
    monkeypatch.setattr(_schema, "CONVERT_AUTO_VACUUM_MAX_BYTES", 1024)
    with caplog.at_level(logging.WARNING, logger="edgesaga.store"):
        async with SQLiteStore(db) as store:
            pragmas = await store.pragmas()
            assert (pragmas["user_version"], pragmas["auto_vacuum"]) == (SCHEMA_VERSION, 0)
            assert await store.prune(max_finished=0) == ["wf-old"]
            assert await store.reclaim() == 0  # nothing can be given back without a VACUUM
    assert "does not shrink" in caplog.text
    assert "VACUUM" in caplog.text


# ------------------------------------------------------------------------------------------------
# Prune in slices, and the space given back


async def _finished(store: SQLiteStore, count: int, *, first: int = 0) -> list[str]:
    ids = [f"done-{i:04d}" for i in range(first, first + count)]
    for i, wid in enumerate(ids):
        at = 1000.0 + first + i
        await store.create_instance(
            new(wid, at=at, request=(f"r-{wid}", {"ok": True, "workflow_id": wid}))
        )
        await store.commit(transition(wid, S.COMPLETED, at=at + 0.5))
    return ids


async def test_prune_keeps_the_newest_finished_across_slices(db: Path, store: SQLiteStore) -> None:
    ids = await _finished(store, 30)
    await store.create_instance(new("live", at=1.0))  # older than all of them, and running
    await store.add_alert({"alert": "of a pruned one"}, workflow_id=ids[0])
    await store.add_alert({"alert": "of none"})
    before = store.commits
    assert await store.prune(max_finished=7, slice_rows=4, now=5000.0) == ids[:23]  # oldest first
    assert store.commits - before >= 23 // 4 + 1  # one write per slice at least
    assert [r.id for r in await store.list_instances()] == [*reversed(ids[23:]), "live"]
    assert rows(db, "SELECT count(*) FROM requests") == [(7,)]
    assert rows(db, "SELECT DISTINCT workflow_id FROM outbox ORDER BY 1") == [
        (None,),
        *sorted([("live",), *((wid,) for wid in ids[23:])]),
    ]
    # Either limit dooms: the count one (keep 6) only done-0023, the age one (finished before
    # now - max_age = 1025.6) done-0023 to done-0025.
    assert await store.prune(max_age=4000, max_finished=6, now=5025.6) == ids[23:26]
    assert await store.prune(max_age=4000, max_finished=6, now=5025.6) == []
    assert await store.prune(max_age=4000, max_finished=2, now=5025.6) == ids[26:28]


async def test_a_slice_stops_after_its_time_and_the_next_goes_on(store: SQLiteStore) -> None:
    ids = await _finished(store, 120)
    store.prune_slice_seconds = -1.0  # every slice is over time after its first 50 instances
    before = store.commits
    assert await store.prune_slice(max_finished=0) == ids[:50]
    assert await store.prune(max_finished=0, slice_rows=200) == ids[50:]
    assert store.commits - before >= 3 + 1  # 50, 50, 20, then the empty slice's write


async def test_workflow_commits_go_in_between_the_slices_of_a_prune(store: SQLiteStore) -> None:
    ids = await _finished(store, 40)
    await store.create_instance(new("live", at=1.0))
    first_slice = asyncio.Event()
    write = store.write

    async def noting(fn: Callable[[sqlite3.Connection], Any]) -> Any:
        result = await write(fn)
        first_slice.set()
        return result

    store.write = noting  # type: ignore[method-assign]
    pruning = asyncio.create_task(store.prune(max_finished=0, slice_rows=5))
    await first_slice.wait()
    await store.commit(transition("live", at=2.0, step="Two"))
    assert not pruning.done()  # the commit did not wait for the rest of the prune
    assert await pruning == ids
    record = await store.load_instance("live")
    assert record is not None
    assert record.current_step == "Two"


async def test_an_attempt_marked_interrupted_then_ended_by_the_engine_is_one_row(
    store: SQLiteStore,
) -> None:
    await populate(store, count=10)
    marked = await store.mark_interrupted_attempts(at=90.0, error="the agent stopped")
    # ACTIVE ones (0, 5) have attempt 2 started; COMPENSATING (4, 9) and PAUSED (3, 8) none
    assert marked == 2
    assert [(j.seq, j.outcome, j.ended_at) for j in await store.journal("wf-000")] == [
        (1, "completed", 1.5),
        (2, "interrupted", 90.0),
    ]
    await store.commit(transition("wf-000", at=91.0, journal=(JournalEnd(2, "interrupted", 91.0),)))
    journal = await store.journal("wf-000")
    assert [(j.seq, j.outcome, j.ended_at) for j in journal] == [
        (1, "completed", 1.5),
        (2, "interrupted", 91.0),
    ]
    assert await store.mark_interrupted_attempts(at=92.0, error="again") == 0


async def test_mark_interrupted_leaves_the_attempts_of_other_statuses(store: SQLiteStore) -> None:
    for wid, status in (("paused", S.PAUSED), ("comp", S.COMPENSATING), ("done", S.COMPLETED)):
        await store.create_instance(new(wid, journal=(started(1, 1.0),)))
        await store.commit(transition(wid, status, at=2.0, journal=(started(2, 2.0),)))
    assert await store.mark_interrupted_attempts(at=3.0, error="stopped") == 2  # comp's two
    outcomes = {
        wid: [j.outcome for j in await store.journal(wid)] for wid in ("paused", "comp", "done")
    }
    assert outcomes == {
        "paused": ["started", "started"],
        "comp": ["interrupted", "interrupted"],
        "done": ["started", "started"],
    }


async def _real_workflows(tmp_path: Path, store: SQLiteStore, count: int) -> None:
    quick = write_definition(
        tmp_path, [step("One", "record_async"), step("Two", "record_async")], workflow_type="Quick"
    )
    builder = WorkflowBuilder(definitions=[quick])
    for _ in range(count):
        wf = await builder.create_workflow("Quick", {}, store=store)
        assert await wf.run() is WorkflowStatus.COMPLETED


def _clone(db: Path, count: int) -> None:
    """``count`` copies of the newest instance with its journal, events and reply, by SQL."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("BEGIN")
        top, template = conn.execute(
            "SELECT max(n), (SELECT max(n) FROM instances) FROM instances"
        ).fetchone()
        series = "WITH RECURSIVE c(v) AS (SELECT 1 UNION ALL SELECT v + 1 FROM c WHERE v < ?2) "
        conn.execute(
            f"{series}INSERT INTO instances(n, id, workflow_type, definition_hash, status, "
            "current_step, error, state, progress, created_at, updated_at, finished_at) "
            "SELECT ?1 + v, 'clone-' || (?1 + v), workflow_type, definition_hash, status, "
            "current_step, error, state, progress, created_at + v, updated_at + v, "
            "finished_at + v FROM c, instances WHERE n = ?3",
            (top, count, template),
        )
        conn.execute(
            f"{series}INSERT INTO journal(k, n, seq, step, phase, attempt, outcome, started_at, "
            f"ended_at, error, outputs) SELECT (?1 + v) * {JOURNAL_SPAN} + seq, ?1 + v, seq, step, "
            "phase, attempt, outcome, started_at, ended_at, error, outputs FROM c, journal "
            f"WHERE k BETWEEN ?3 * {JOURNAL_SPAN} AND ?3 * {JOURNAL_SPAN} + {JOURNAL_SPAN - 1}",
            (top, count, template),
        )
        conn.execute(
            f"{series}INSERT INTO outbox(kind, workflow_id, payload, n) SELECT kind, "
            "'clone-' || (?1 + v), payload, ?1 + v FROM c, outbox o JOIN instances i "
            "ON i.id = o.workflow_id WHERE i.n = ?3 ORDER BY v, o.seq",
            (top, count, template),
        )
        conn.execute(
            "INSERT INTO requests(request_id, reply, created_at, command_hash, workflow_id) "
            "SELECT 'r-' || id, json_object('ok', json('true'), 'workflow_id', id), "
            "strftime('%s', 'now'), 'h', id FROM instances WHERE id LIKE 'clone-%'"
        )
        conn.execute("COMMIT")
    finally:
        conn.close()


async def test_after_a_large_prune_the_file_is_near_a_fresh_one_of_what_is_left(
    tmp_path: Path,
) -> None:
    fresh, big = tmp_path / "fresh" / "edgesaga.db", tmp_path / "big" / "edgesaga.db"
    async with SQLiteStore(fresh) as store:
        await _real_workflows(tmp_path, store, 100)
        await store.checkpoint()
    async with SQLiteStore(big) as store:
        await _real_workflows(tmp_path, store, 20)
    _clone(big, 4980)
    async with SQLiteStore(big) as store:
        assert len(await store.list_instances(limit=10_000)) == 5000
        grown = file_size(big)
        pruned = await store.prune(max_finished=100)
        assert len(pruned) == 4900
        assert file_size(big) >= grown  # freed pages stay in the file until reclaimed
        freed = await store.reclaim(max_pages=500)
        assert freed > 0
        assert rows(big, "PRAGMA freelist_count") == [(0,)]
        assert len(await store.list_instances(limit=10_000)) == 100
    assert file_size(fresh) * 20 < grown  # what there was to give back
    assert file_size(big) <= 2 * file_size(fresh), (file_size(big), file_size(fresh))


async def test_a_large_prune_folds_the_wal_between_its_slices(tmp_path: Path) -> None:
    """Each slice's pages go into the database right after it, in a write of their own: the WAL
    never holds several slices (which the auto-checkpoint would then copy inside some running
    workflow's commit)."""
    db = tmp_path / "edgesaga.db"
    async with SQLiteStore(db) as store:
        await _real_workflows(tmp_path, store, 20)
    _clone(db, 4980)
    async with SQLiteStore(db) as store:
        await store.checkpoint()  # an empty WAL (truncated) before the prune
        assert wal_size(db) == 0
        frames = _schema.PAGE_SIZE + 24
        pruned = await store.prune(max_finished=100, slice_rows=100)
        assert len(pruned) == 4900
        # about one slice's frames: without the folds it grows to the auto-checkpoint's 4096
        assert wal_size(db) < 1500 * frames, wal_size(db) // frames
        await store.reclaim(max_pages=500)
        assert wal_size(db) == 0  # reclaim ends with a truncating checkpoint


async def test_a_fold_that_fails_does_not_stop_the_prune(store: SQLiteStore, db: Path) -> None:
    await _finished(store, 300)
    read, folds = store.read, []

    async def failing_fold(fn: Callable[[sqlite3.Connection], Any]) -> Any:
        if "PRAGMA wal_checkpoint(PASSIVE)" in fn.__code__.co_consts:  # the fold's statement
            folds.append(fn)
            raise DiskFull(f"The disk holding {db} is full; free space on it first.")
        return await read(fn)

    store.read = failing_fold  # type: ignore[method-assign]
    pruned = await store.prune(max_finished=0, slice_rows=100)
    assert len(pruned) == 300
    assert len(folds) == 3  # one a slice, each failed
    assert rows(db, "SELECT count(*) FROM instances") == [(0,)]


async def test_reclaim_goes_in_bounded_slices(store: SQLiteStore, db: Path) -> None:
    await _finished(store, 400)
    await store.prune(max_finished=0)
    free = rows(db, "PRAGMA freelist_count")[0][0]
    assert free > 120  # a few writes of 50 after the first two
    before = store.commits
    assert await store.reclaim(max_pages=10, max_slices=2) == 20
    assert store.commits - before == 2
    assert rows(db, "PRAGMA freelist_count") == [(free - 20,)]
    store.reclaim_slice_seconds = -1.0  # every write is over time after its first 10 pages
    before = store.commits
    assert await store.reclaim(max_pages=2000) == free - 20
    assert store.commits - before == -(-(free - 20) // 10)  # 10 pages a write
    assert rows(db, "PRAGMA freelist_count") == [(0,)]


# ------------------------------------------------------------------------------------------------
# Reads off the writer


async def test_a_write_commits_while_a_slow_read_runs(store: SQLiteStore) -> None:
    await store.create_instance(new("wf-1", at=1.0))
    reading, written = threading.Event(), threading.Event()

    def slow_read(conn: sqlite3.Connection) -> tuple[str, bool, str]:
        before = conn.execute("SELECT current_step FROM instances").fetchone()[0]
        reading.set()
        committed = written.wait(10)  # the write below commits while this read is open
        after = conn.execute("SELECT current_step FROM instances").fetchone()[0]
        return before, committed, after

    query = asyncio.create_task(store.query(slow_read))
    await asyncio.to_thread(reading.wait, 10)
    await store.commit(transition("wf-1", at=2.0, step="Two"))
    written.set()
    # it committed before the read returned, which saw one snapshot throughout
    assert await query == ("One", True, "One")
    assert (
        await store.query(lambda c: c.execute("SELECT current_step FROM instances").fetchone())
    ) == ("Two",)
    record = await store.load_instance("wf-1")  # a read after a commit sees it
    assert record is not None
    assert record.current_step == "Two"


async def test_a_read_does_not_wait_behind_a_write(store: SQLiteStore) -> None:
    await store.create_instance(new("wf-1", at=1.0))
    in_write, release = threading.Event(), threading.Event()

    def blocking_write(conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE instances SET current_step = 'Held'")
        in_write.set()
        release.wait(10)

    writing = asyncio.create_task(store.write(blocking_write))
    await asyncio.to_thread(in_write.wait, 10)
    try:
        listed = await store.list_instances()  # answered while the writer is busy
        assert [(r.id, r.current_step) for r in listed] == [("wf-1", "One")]
        assert not writing.done()
    finally:
        release.set()
    await writing
    assert (await store.list_instances())[0].current_step == "Held"


async def test_a_memory_store_queries_on_its_one_connection() -> None:
    async with MemoryStore() as store:
        await store.create_instance(new("wf-1", at=1.0))
        assert [r.id for r in (await store.list_page())[0]] == ["wf-1"]
        assert [n for n, _ in await store.resumable_page()] == [1]


# ------------------------------------------------------------------------------------------------
# The paged list and the recovery pages


async def _mixed(store: SQLiteStore) -> None:
    for i in range(23):
        status = (S.ACTIVE, S.COMPLETED, S.PAUSED)[i % 3]
        wid = f"wf-{i:02d}"
        await store.create_instance(new(wid, workflow_type="Alpha" if i % 2 else "Beta", at=i // 2))
        if status is not S.ACTIVE:
            await store.commit(transition(wid, status, at=50.0))


async def _all_pages(
    page: Callable[..., Awaitable[tuple[list[Any], str | None]]], **kw: Any
) -> list[list[str]]:
    pages, cursor = [], None
    while True:
        records, cursor = await page(**kw, cursor=cursor)
        pages.append([r.id for r in records])
        if cursor is None:
            return pages


@pytest.mark.parametrize(
    "filters",
    [
        {},
        {"status": "ACTIVE"},
        {"status": ["PAUSED", "COMPLETED"]},
        {"workflow_type": "Alpha"},
        {"workflow_type": "Beta", "status": ["ACTIVE", "PAUSED"]},
        {"created_after": 3, "created_before": 9},
        {"status": "COMPLETED", "created_after": 2},
    ],
)
async def test_pages_of_a_list_hold_each_instance_once_newest_first(
    store: SQLiteStore, filters: dict[str, Any]
) -> None:
    await _mixed(store)
    every = await store.list_instances(
        status=filters.get("status"), workflow_type=filters.get("workflow_type"), limit=100
    )
    low, high = filters.pop("created_after", -1), filters.pop("created_before", 100)
    expected = [r.id for r in every if low < r.created_at < high]
    assert expected  # something to page through
    pages = await _all_pages(
        store.list_page, **filters, created_after=low, created_before=high, limit=3
    )
    assert [wid for page in pages for wid in page] == expected
    assert all(len(p) == 3 for p in pages[:-1])
    assert 0 < len(pages[-1]) <= 3


async def test_list_order_is_newest_first_then_id(store: SQLiteStore) -> None:
    await _mixed(store)  # two instances share each creation time
    ids = [r.id for r in (await store.list_page(limit=5))[0]]
    assert ids == ["wf-22", "wf-20", "wf-21", "wf-18", "wf-19"]


@pytest.mark.parametrize(
    "cursor", ["", "x", "!!!!", "bm90LWEtY3Vyc29y", "aW5mOndm", "OndmLTE", "a" * 401]
)
async def test_a_cursor_the_agent_did_not_give_is_refused(store: SQLiteStore, cursor: str) -> None:
    with pytest.raises(ValueError, match="not one this agent gave; start again without --cursor"):
        await store.list_page(cursor=cursor)


@pytest.mark.parametrize("limit", [0, -1, 1001])
async def test_a_page_is_bounded(store: SQLiteStore, limit: int) -> None:
    with pytest.raises(ValueError, match="between 1 and 1000"):
        await store.list_page(limit=limit)
    with pytest.raises(ValueError, match="between 1 and"):
        await store.resumable_page(limit=limit * 100)


async def test_resumable_pages_are_every_resumable_instance_in_creation_order(
    store: SQLiteStore,
) -> None:
    await populate(store, count=23)  # ACTIVE and COMPENSATING: every 5th from 0 and from 4
    got, after = [], 0
    while page := await store.resumable_page(after_n=after, limit=2):
        assert all(
            rec.definition == '{"workflow_type": "' + rec.workflow_type + '"}' for _, rec in page
        )
        got.extend((rec.id, rec.status.value) for _, rec in page)
        after = page[-1][0]
    expected = [
        (f"wf-{i:03d}", "ACTIVE" if i % 5 == 0 else "COMPENSATING")
        for i in range(23)
        if i % 5 in (0, 4)
    ]
    assert got == expected


async def test_commit_many_writes_each_workflow_in_one_transaction(store: SQLiteStore) -> None:
    for wid in ("wf-a", "wf-b"):
        await store.create_instance(new(wid, at=1.0))
    before = store.commits
    await store.commit_many(
        [transition("wf-a", S.COMPLETED, at=5.0), transition("wf-b", at=5.0, step="Two")]
    )
    assert store.commits - before == 1
    got = {r.id: (r.status, r.current_step) for r in await store.list_instances()}
    assert got == {"wf-a": (S.COMPLETED, "One"), "wf-b": (S.ACTIVE, "Two")}
    assert await store.count_by_status(["COMPLETED", "PAUSED"]) == {"COMPLETED": 1}
