"""The SQLite store: pragmas, the process lock, the outbox, group commit, retention, request ids.

Every test uses a real SQLite file in ``tmp_path``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from _engine_fixtures import PAYMENT_DATA, PAYMENT_DIR, step, write_definition

from agent import (
    DatabaseLocked,
    MemoryStore,
    SQLiteStore,
    StoreError,
    Workflow,
    WorkflowBuilder,
    WorkflowStatus,
)
from agent._store import _MIGRATIONS, SCHEMA_VERSION, JournalStart, Transition

EXPECTED_PRAGMAS = {
    "journal_mode": "wal",
    "synchronous": 2,
    "foreign_keys": 1,
    "user_version": SCHEMA_VERSION,
    "wal_autocheckpoint": 4096,
    "page_size": 1024,
}


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "edgesaga.db"


@pytest.fixture(params=["file", "memory"])
async def store(request: pytest.FixtureRequest, db: Path) -> AsyncIterator[SQLiteStore]:
    """Each test that takes it runs on a database file and on MemoryStore (the same store on an
    in-memory database, for tests and tools that need nothing to survive)."""
    async with SQLiteStore(db) if request.param == "file" else MemoryStore() as s:
        yield s


@pytest.fixture
def builder(tmp_path: Path) -> WorkflowBuilder:
    quick = write_definition(
        tmp_path, [step("One", "record_async"), step("Two", "record_async")], workflow_type="Quick"
    )
    return WorkflowBuilder(definitions=[PAYMENT_DIR, quick])


async def run_quick(builder: WorkflowBuilder, store: SQLiteStore, **kw: object) -> Workflow:
    wf = await builder.create_workflow("Quick", {}, store=store, **kw)  # type: ignore[arg-type]
    assert await wf.run() is WorkflowStatus.COMPLETED
    return wf


def bare_transition(
    workflow_id: str, step: str | None, *, at: float | None = None, **extra: Any
) -> Transition:
    """A transition to ACTIVE at ``step`` with one status event, built by hand (no engine)."""
    fields: dict[str, Any] = {
        "events": [("event", {"seq": None, "event": "status_changed", "step": step})],
        **extra,
    }
    return Transition(
        workflow_id=workflow_id,
        status=WorkflowStatus.ACTIVE,
        current_step=step,
        error=None,
        state_json="{}",
        progress_json='{"status":"ACTIVE"}',
        at=time.time() if at is None else at,
        **fields,
    )


def subset(pragmas: dict[str, object]) -> dict[str, object]:
    return {k: pragmas[k] for k in EXPECTED_PRAGMAS}


# ------------------------------------------------------------------------------------------------
# Pragmas and the lock


async def test_pragmas_on_create_and_after_reopen(db: Path) -> None:
    async with SQLiteStore(db) as store:
        assert subset(await store.pragmas()) == EXPECTED_PRAGMAS
    async with SQLiteStore(db) as store:
        assert subset(await store.pragmas()) == EXPECTED_PRAGMAS
    async with SQLiteStore(db, readonly=True) as ro:
        pragmas = await ro.pragmas()
        assert pragmas["journal_mode"] == "wal"
        assert pragmas["synchronous"] == 2
        assert pragmas["user_version"] == SCHEMA_VERSION


async def test_second_store_on_the_same_file_is_locked_out(db: Path) -> None:
    first = SQLiteStore(db)
    await first.open()
    try:
        assert SQLiteStore.is_locked(db)
        second = SQLiteStore(db)
        with pytest.raises(DatabaseLocked) as info:
            await second.open()
        assert info.value.path == str(db)
        assert "Another edgesaga process" in str(info.value)
        assert not second.is_open
        # The first one still works.
        assert await first.ping()
    finally:
        await first.close()
    assert not SQLiteStore.is_locked(db)
    async with SQLiteStore(db) as again:
        assert await again.ping()


async def test_memory_store_keeps_nothing_and_writes_no_file(
    tmp_path: Path, builder: WorkflowBuilder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    async with MemoryStore() as store:
        wf = await run_quick(builder, store)
        assert (await store.load_instance(wf.id)) is not None
        assert await store.outbox_count() > 0
    async with MemoryStore() as again:
        assert await again.list_instances() == []
        assert await again.outbox_count() == 0
    assert await asyncio.to_thread(os.listdir, tmp_path) == ["Quick.yaml"]  # the definition only


async def test_readonly_store_refuses_writes(db: Path, builder: WorkflowBuilder) -> None:
    async with SQLiteStore(db) as store:
        wf = await run_quick(builder, store)
    async with SQLiteStore(db, readonly=True) as ro:
        record = await ro.load_instance(wf.id)
        assert record is not None
        assert record.status is WorkflowStatus.COMPLETED
        with pytest.raises(StoreError, match="read-only"):
            await ro.put_request("r", {})


async def test_closed_store_says_how_to_open_it(db: Path) -> None:
    with pytest.raises(StoreError, match="not open"):
        await SQLiteStore(db).ping()


async def test_newer_schema_is_refused(db: Path) -> None:
    async with SQLiteStore(db) as store:
        await store.write(lambda c: c.execute("PRAGMA user_version = 99"))
    with pytest.raises(StoreError, match="newer"):
        await SQLiteStore(db).open()
    assert not SQLiteStore.is_locked(db)  # a failed open releases the lock


async def test_version_1_database_is_migrated_with_its_journal(db: Path) -> None:
    """A database written by the first release (journal keyed (n, seq), WITHOUT ROWID) opens with
    its journal intact, and its workflows keep appending to it."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    for statement in _MIGRATIONS[1].split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO definitions VALUES ('h', 'Old', '1', '{}')")
    for n, wid in ((1, "wf-a"), (2, "wf-b")):
        conn.execute(
            "INSERT INTO instances(n, id, workflow_type, definition_hash, status, current_step, "
            "state, progress, created_at, updated_at) VALUES (?, ?, 'Old', 'h', 'ACTIVE', 'S2', "
            "'{}', '{\"status\":\"ACTIVE\"}', 1.0, 2.0)",
            (n, wid),
        )
        conn.executemany(
            "INSERT INTO journal VALUES (?, ?, ?, 'forward', 1, ?, ?, ?, ?)",
            [
                (n, 1, "S1", "completed", 1.0, 1.5, None),
                (n, 2, "S2", "failed", 1.5, 1.8, f"boom {wid}"),
            ],
        )
    conn.close()

    async with SQLiteStore(db) as store:
        assert (await store.pragmas())["user_version"] == SCHEMA_VERSION
        for wid in ("wf-a", "wf-b"):
            rows = await store.journal(wid)
            assert [(r.workflow_id, r.seq, r.step, r.outcome, r.error) for r in rows] == [
                (wid, 1, "S1", "completed", None),
                (wid, 2, "S2", "failed", f"boom {wid}"),
            ]
        await store.commit(
            bare_transition(
                "wf-a", "S2", at=3.0, journal=[JournalStart(3, "S2", "forward", 2, 3.0)]
            )
        )
        assert [r.seq for r in await store.journal("wf-a")] == [1, 2, 3]
        assert [r.seq for r in await store.journal("wf-b")] == [1, 2]


# ------------------------------------------------------------------------------------------------
# Outbox


async def test_outbox_in_seq_order_ack_deletes(
    store: SQLiteStore, builder: WorkflowBuilder
) -> None:
    wf = await run_quick(builder, store)
    items = await store.outbox_pending(limit=1000)
    assert items, "a run writes events"
    seqs = [i.seq for i in items]
    assert seqs == sorted(seqs)
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # gap-free
    assert all(i.payload["seq"] == i.seq for i in items)
    assert all(i.workflow_id == wf.id and i.kind == "event" for i in items)
    assert items[0].payload["event"] == "workflow_started"
    assert items[-1].payload["event"] == "status_changed"
    assert items[-1].payload["status"] == "COMPLETED"

    # paging with after_seq
    assert await store.outbox_pending(limit=2, after_seq=seqs[1]) == items[2:4]

    await store.outbox_ack(seqs[:3])
    left = await store.outbox_pending(limit=1000)
    assert [i.seq for i in left] == seqs[3:]
    await store.outbox_ack(seqs[3:])
    assert await store.outbox_pending() == []
    assert await store.outbox_count() == 0


async def test_outbox_seq_never_reused_after_ack_and_reopen(
    db: Path, builder: WorkflowBuilder
) -> None:
    async with SQLiteStore(db) as store:
        await run_quick(builder, store)
        first = [i.seq for i in await store.outbox_pending(limit=1000)]
        await store.outbox_ack(first)
    async with SQLiteStore(db) as store:
        await run_quick(builder, store)
        second = [i.seq for i in await store.outbox_pending(limit=1000)]
        assert second
        assert min(second) > max(first)
        await store.outbox_ack(second[-1:])  # only the newest: the others stay pending
    async with SQLiteStore(db) as store:
        await run_quick(builder, store)
        third = [i.seq for i in await store.outbox_pending(limit=1000)]
        assert third[: len(second) - 1] == second[:-1]
        assert min(third[len(second) - 1 :]) > max(second)


async def test_outbox_seq_never_reused_after_trim_and_reopen(
    db: Path, builder: WorkflowBuilder
) -> None:
    """Trimmed (never published) events must not hand their seq to new events either: subscribers
    dedupe on seq."""
    async with SQLiteStore(db) as store:
        await run_quick(builder, store)
        first = [i.seq for i in await store.outbox_pending(limit=1000)]
        assert await store.outbox_trim(0) == len(first)
    async with SQLiteStore(db) as store:
        await run_quick(builder, store)
        second = [i.seq for i in await store.outbox_pending(limit=1000)]
        assert min(second) > max(first)


async def test_outbox_trim_drops_finished_workflows_first(
    store: SQLiteStore, builder: WorkflowBuilder
) -> None:
    done = await run_quick(builder, store)
    waiting = await builder.create_workflow("Quick", {}, store=store)  # ACTIVE: 1 event
    total = await store.outbox_count()
    dropped = await store.outbox_trim(1)
    assert dropped == total - 1
    left = await store.outbox_pending()
    assert [i.workflow_id for i in left] == [waiting.id]
    assert done.id != waiting.id


async def test_outbox_last_seq_is_the_newest_pending_item(
    store: SQLiteStore, builder: WorkflowBuilder
) -> None:
    """What the link marks a pruned workflow with: the seq of the newest item still pending."""
    assert await store.outbox_last_seq() == 0
    await run_quick(builder, store)
    seqs = [i.seq for i in await store.outbox_pending(limit=1000)]
    assert await store.outbox_last_seq() == seqs[-1]
    await store.outbox_ack(seqs[-2:])
    assert await store.outbox_last_seq() == seqs[-3]
    await store.outbox_ack(seqs)
    assert await store.outbox_last_seq() == 0


async def test_wait_outbox_wakes_on_commit(store: SQLiteStore, builder: WorkflowBuilder) -> None:
    assert await store.wait_outbox(timeout=0.01) is False
    await run_quick(builder, store)
    assert await store.wait_outbox(timeout=1) is True


# ------------------------------------------------------------------------------------------------
# Group commit


async def test_group_commit_shares_transactions(
    store: SQLiteStore, builder: WorkflowBuilder, capsys: pytest.CaptureFixture[str]
) -> None:
    commits, batched = store.commits, store.batched

    async def one(i: int) -> WorkflowStatus:
        data = {**PAYMENT_DATA, "order_id": f"ORD-{i}"}
        wf = await builder.create_workflow("PaymentProcessing", data, store=store, saga_mode=True)
        return await wf.run()

    statuses = await asyncio.gather(*(one(i) for i in range(32)))
    capsys.readouterr()
    assert statuses == [WorkflowStatus.COMPLETED] * 32
    writes = store.batched - batched
    txns = store.commits - commits
    assert writes >= 32 * 5  # create with step 1's start, 3 x (result + next start), final
    assert txns * 2 <= writes, f"{txns} transactions for {writes} writes: no group commit"
    assert len(await store.list_instances(status="COMPLETED", limit=100)) == 32


async def test_failed_request_in_a_batch_does_not_sink_the_others(
    store: SQLiteStore, builder: WorkflowBuilder
) -> None:
    wf = await builder.create_workflow("Quick", {}, store=store)
    ghost = bare_transition("no-such-workflow", None)
    before = await store.outbox_count()
    results = await asyncio.gather(
        store.commit(ghost), store.put_request("r-batch", {"ok": True}), return_exceptions=True
    )
    assert isinstance(results[0], StoreError)
    assert "no-such-workflow" in str(results[0])
    assert results[1] is None
    assert await store.get_request("r-batch") == {"ok": True}
    assert await store.outbox_count() == before  # the ghost's event was rolled back
    assert await wf.run() is WorkflowStatus.COMPLETED


async def test_bulk_write_of_transitions_survives_one_bad_one(
    store: SQLiteStore, builder: WorkflowBuilder
) -> None:
    """Transitions of several workflows queued together are written with one executemany per
    table; one for a workflow that is not there makes the batch fall back to one savepoint each,
    so only that one fails and the event numbers stay gap-free."""
    one = await builder.create_workflow("Quick", {}, store=store)
    two = await builder.create_workflow("Quick", {}, store=store)

    top = max([i.seq for i in await store.outbox_pending(limit=1000)], default=0)
    commits = store.commits
    gate = threading.Event()
    blocked = asyncio.ensure_future(store.read(lambda conn: gate.wait(5)))  # hold the store thread
    await asyncio.sleep(0.05)
    writes = [
        asyncio.ensure_future(store.commit(bare_transition(wid, step)))
        for wid, step in ((one.id, "Two"), ("no-such-workflow", "X"), (two.id, "Two"))
    ]
    await asyncio.sleep(0.05)
    gate.set()
    assert await blocked is True
    results = await asyncio.gather(*writes, return_exceptions=True)
    assert results[0] is None
    assert results[2] is None
    assert isinstance(results[1], StoreError)
    assert "no-such-workflow" in str(results[1])
    assert store.commits == commits + 1  # all three in one transaction
    for wf in (one, two):
        record = await store.load_instance(wf.id)
        assert record is not None
        assert record.current_step == "Two"
    items = [i for i in await store.outbox_pending(limit=1000) if i.seq > top]
    assert [i.workflow_id for i in items] == [one.id, two.id]
    assert [i.seq for i in items] == [top + 1, top + 2]


async def test_events_are_stored_compact_and_read_back_whole(
    db: Path, builder: WorkflowBuilder
) -> None:
    async with SQLiteStore(db) as store:
        wf = await run_quick(builder, store)
        items = await store.outbox_pending(limit=1000)
    first = items[1]  # step_started of the first step
    assert first.payload == {
        "seq": first.seq,
        "at": first.payload["at"],
        "workflow_id": wf.id,
        "workflow_type": "Quick",
        "event": "step_started",
        "step": "One",
        "attempt": 1,
        "status": "ACTIVE",
        "error": None,
    }
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        raw = conn.execute("SELECT payload FROM outbox WHERE seq = ?", (first.seq,)).fetchone()[0]
    finally:
        conn.close()
    stored = json.loads(raw)
    assert set(stored) == {"at", "event", "step", "attempt", "status"}  # no ids, no nulls
    assert len(raw) < len(json.dumps(first.payload, separators=(",", ":"))) * 0.7


# ------------------------------------------------------------------------------------------------
# Retention


async def test_prune_by_count_and_age_keeps_active(
    store: SQLiteStore, builder: WorkflowBuilder
) -> None:
    finished = []
    for _ in range(5):
        finished.append((await run_quick(builder, store)).id)
        await asyncio.sleep(0.002)  # distinct finished_at
    active = [(await builder.create_workflow("Quick", {}, store=store)).id for _ in range(2)]

    pruned = await store.prune(max_finished=2)
    assert sorted(pruned) == sorted(finished[:3])
    for wid in finished[:3]:
        assert await store.load_instance(wid) is None
        assert await store.journal(wid) == []
    for wid in finished[3:]:
        assert len(await store.journal(wid)) == 2
    remaining = {r.id for r in await store.list_instances(limit=100)}
    assert remaining == set(finished[3:]) | set(active)

    assert await store.prune(max_age=3600) == []  # nothing is an hour old yet
    pruned = await store.prune(max_age=60, now=time.time() + 3600)
    assert sorted(pruned) == sorted(finished[3:])
    remaining_records = await store.list_instances(limit=100)
    assert {r.id for r in remaining_records} == set(active)
    assert all(r.status is WorkflowStatus.ACTIVE for r in remaining_records)
    # the definition the ACTIVE ones need is kept; the database stays consistent
    assert await store.read(lambda c: c.execute("PRAGMA foreign_key_check").fetchall()) == []
    # A builder without any definition still runs it, from the snapshot stored with it.
    wf = await WorkflowBuilder().load_workflow(active[0], store)
    assert await wf.run() is WorkflowStatus.COMPLETED


async def test_prune_with_no_limits_removes_nothing(
    store: SQLiteStore, builder: WorkflowBuilder
) -> None:
    wf = await run_quick(builder, store)
    assert await store.prune() == []
    assert await store.load_instance(wf.id) is not None


# ------------------------------------------------------------------------------------------------
# Request ids


async def test_request_ids_first_one_wins(db: Path) -> None:
    async with SQLiteStore(db) as store:
        assert await store.get_request("r-1") is None
        await store.put_request("r-1", {"ok": True, "workflow_id": "first"})
        await store.put_request("r-1", {"ok": True, "workflow_id": "second"})
        assert await store.get_request("r-1") == {"ok": True, "workflow_id": "first"}
    async with SQLiteStore(db) as store:
        assert await store.get_request("r-1") == {"ok": True, "workflow_id": "first"}


async def test_request_stored_with_the_instance(
    store: SQLiteStore, builder: WorkflowBuilder
) -> None:
    wf = await builder.create_workflow(
        "Quick", {}, store=store, workflow_id="wf-req", request=("r-2", {"ok": True})
    )
    assert await store.get_request("r-2") == {"ok": True, "workflow_id": wf.id}
    again = await builder.create_workflow(
        "Quick", {}, store=store, workflow_id="wf-req", request=("r-2", {"ok": False})
    )
    assert again is wf
    assert await store.get_request("r-2") == {"ok": True, "workflow_id": "wf-req"}
