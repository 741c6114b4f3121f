"""The store's decisions pinned down, one by one: what a transition writes, what the reads and the
recovery queries return, what prune and the outbox trim keep. Each test drives ``SQLiteStore``
on a real file with transitions built by hand (no engine), so it is fast enough to run for every
mutant of ``agent/_store.py`` (see docs/testing.md)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent import SQLiteStore, StoreError, WorkflowStatus
from agent._store import COMMAND_HASH, JournalEnd, JournalStart, NewInstance, Transition

S = WorkflowStatus


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "edgesaga.db"


@pytest.fixture
async def store(db: Path) -> AsyncIterator[SQLiteStore]:
    async with SQLiteStore(db) as s:
        yield s


def transition(
    wid: str,
    status: WorkflowStatus = S.ACTIVE,
    *,
    at: float = 100.0,
    step: str | None = "One",
    error: str | None = None,
    state: dict[str, Any] | None = None,
    journal: tuple[JournalStart | JournalEnd, ...] = (),
    events: int = 1,
) -> Transition:
    return Transition(
        workflow_id=wid,
        status=status,
        current_step=step,
        error=error,
        state_json=json.dumps(state or {"n": 1}),
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
    status: WorkflowStatus = S.ACTIVE,
    request: tuple[str, dict[str, Any]] | None = None,
    **kw: Any,
) -> NewInstance:
    return NewInstance(
        id=wid,
        workflow_type=workflow_type,
        workflow_version="1.0.0",
        definition_hash=f"hash-{workflow_type}",
        definition=json.dumps({"workflow_type": workflow_type}),
        first=transition(wid, status, at=at, **kw),
        request=request,
    )


async def seqs(store: SQLiteStore) -> list[int]:
    return [i.seq for i in await store.outbox_pending(limit=10_000)]


def rows(db: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------------
# create_instance, commit and the record read back


async def test_create_with_a_first_transition_that_ends_an_attempt(store: SQLiteStore) -> None:
    journal = (JournalStart(1, "One", "forward", 1, 1.0), JournalEnd(1, "failed", 2.0, "no"))
    await store.create_instance(new("wf-1", journal=journal))
    [entry] = await store.journal("wf-1")
    assert (entry.outcome, entry.ended_at, entry.error) == ("failed", 2.0, "no")


async def test_create_instance_says_whether_it_wrote(store: SQLiteStore) -> None:
    assert await store.create_instance(new("wf-1", state={"a": 1})) is True
    again = new("wf-1", workflow_type="Beta", state={"a": 2}, request=("r-x", {"ok": True}))
    assert await store.create_instance(again) is False
    record = await store.load_instance("wf-1")
    assert record is not None
    assert record.workflow_type == "Alpha"
    assert record.state == {"a": 1}
    assert await store.get_request("r-x") is None  # the refused create wrote nothing
    assert await seqs(store) == [1]


async def test_record_maps_every_column(store: SQLiteStore) -> None:
    await store.create_instance(new("wf-1", at=10.0, step="First"))
    await store.commit(
        transition("wf-1", S.FAILED, at=20.0, step="Second", error="boom", state={"x": [1, 2]})
    )
    record = await store.load_instance("wf-1")
    assert record is not None
    assert record.id == "wf-1"
    assert record.workflow_type == "Alpha"
    assert record.definition_hash == "hash-Alpha"
    assert record.status is S.FAILED
    assert record.current_step == "Second"
    assert record.error == "boom"
    assert record.state == {"x": [1, 2]}
    assert record.progress == {"status": "FAILED"}
    assert record.created_at == 10.0
    assert record.updated_at == 20.0
    assert record.definition == json.dumps({"workflow_type": "Alpha"})
    listed = await store.list_instances()
    assert listed == [record._replace(definition=None)]
    assert await store.load_instance("wf-none") is None


async def test_finished_at_is_set_only_by_a_finished_status(db: Path, store: SQLiteStore) -> None:
    await store.create_instance(new("wf-1", at=1.0))
    await store.commit(transition("wf-1", S.PAUSED, at=2.0))
    assert rows(db, "SELECT finished_at FROM instances") == [(None,)]
    await store.commit(transition("wf-1", S.COMPLETED, at=3.0))
    assert rows(db, "SELECT finished_at, updated_at FROM instances") == [(3.0, 3.0)]


async def test_commit_to_a_missing_workflow_fails_and_writes_nothing(store: SQLiteStore) -> None:
    with pytest.raises(StoreError, match="wf-ghost is not in the database"):
        await store.commit(transition("wf-ghost"))
    assert await seqs(store) == []
    assert await store.outbox_last_seq() == 0


async def test_commit_to_a_row_gone_under_a_known_id_fails(store: SQLiteStore) -> None:
    """The store knows the row of each workflow it wrote; a row deleted behind its back is an
    error naming the workflows of the commit, not a commit that updates nothing."""
    await store.create_instance(new("wf-1"))
    await store.create_instance(new("wf-2"))
    await store.write(lambda conn: conn.execute("DELETE FROM instances WHERE id = 'wf-1'"))
    with pytest.raises(StoreError) as info:
        await store.commit(transition("wf-1"))
    assert str(info.value) == "Workflow wf-1 is not in the database (pruned?)."
    await store.commit(transition("wf-2", S.PAUSED))  # the others still commit
    assert await seqs(store) == [1, 2, 3]


async def test_journal_rows_of_each_instance_in_order(store: SQLiteStore) -> None:
    start = JournalStart(1, "One", "forward", 1, 5.0)
    await store.create_instance(new("wf-a", journal=(start,)))
    await store.create_instance(new("wf-b", journal=(start._replace(step="Uno"),)))
    await store.commit(
        transition(
            "wf-a",
            journal=(JournalEnd(1, "failed", 6.0, "no"), JournalStart(2, "One", "forward", 2, 7.0)),
        )
    )
    await store.commit(transition("wf-a", journal=(JournalEnd(2, "completed", 8.0),)))
    entries = await store.journal("wf-a")
    assert [tuple(e) for e in entries] == [
        ("wf-a", 1, "One", "forward", 1, "failed", 5.0, 6.0, "no"),
        ("wf-a", 2, "One", "forward", 2, "completed", 7.0, 8.0, None),
    ]
    assert [tuple(e) for e in await store.journal("wf-b")] == [
        ("wf-b", 1, "Uno", "forward", 1, "started", 5.0, None, None)
    ]
    assert await store.journal("wf-none") == []


async def test_bulk_commit_writes_every_column_of_each(store: SQLiteStore) -> None:
    """Transitions of several workflows queued together share one transaction."""
    for wid in ("wf-a", "wf-b"):
        await store.create_instance(new(wid))
    await asyncio.gather(
        store.commit(transition("wf-a", S.COMPLETED, at=9.0, step="A", error="ea")),
        store.commit(transition("wf-b", S.CANCELLED, at=8.0, step="B", error="eb")),
    )
    got = {
        r.id: (r.status, r.current_step, r.error, r.updated_at)
        for r in await store.list_instances()
    }
    assert got == {"wf-a": (S.COMPLETED, "A", "ea", 9.0), "wf-b": (S.CANCELLED, "B", "eb", 8.0)}
    assert await seqs(store) == [1, 2, 3, 4]


# ------------------------------------------------------------------------------------------------
# Reads and the recovery queries


async def test_list_instances_filters_by_status_and_type(store: SQLiteStore) -> None:
    await store.create_instance(new("a1", workflow_type="Alpha", at=1.0))
    await store.create_instance(new("a2", workflow_type="Alpha", at=2.0))
    await store.create_instance(new("b1", workflow_type="Beta", at=3.0))
    await store.create_instance(new("b2", workflow_type="Beta", at=4.0, status=S.PAUSED))
    await store.commit(transition("a2", S.COMPLETED, at=5.0))

    def ids(records: list[Any]) -> list[str]:
        return [r.id for r in records]

    assert ids(await store.list_instances()) == ["b2", "b1", "a2", "a1"]  # newest first
    assert ids(await store.list_instances(status="ACTIVE")) == ["b1", "a1"]
    assert ids(await store.list_instances(status=["ACTIVE", "PAUSED"])) == ["b2", "b1", "a1"]
    assert ids(await store.list_instances(workflow_type="Alpha")) == ["a2", "a1"]
    assert ids(await store.list_instances(status="ACTIVE", workflow_type="Beta")) == ["b1"]
    assert ids(await store.list_instances(status=[], workflow_type="")) == ["b2", "b1", "a2", "a1"]
    assert ids(await store.list_instances(limit=2, offset=1)) == ["b1", "a2"]
    with pytest.raises(ValueError, match="NOPE"):
        await store.list_instances(status="NOPE")
    assert await store.count_by_status() == {"ACTIVE": 2, "PAUSED": 1, "COMPLETED": 1}


async def test_list_instances_same_time_ordered_by_id(store: SQLiteStore) -> None:
    for wid in ("c", "a", "b"):
        await store.create_instance(new(wid, at=1.0))
    assert [r.id for r in await store.list_instances()] == ["a", "b", "c"]


async def test_request_replies_and_their_command_hash(db: Path, store: SQLiteStore) -> None:
    await store.put_request("r-1", {"ok": True, COMMAND_HASH: "h1"})
    await store.put_request("r-2", {"ok": True}, "h2")
    await store.put_request("r-1", {"ok": False}, "other")  # the first one wins
    assert await store.lookup_request("r-1") == ({"ok": True}, "h1")
    assert await store.lookup_request("r-2") == ({"ok": True}, "h2")
    assert await store.lookup_request("r-3") is None
    assert await store.get_request("r-1") == {"ok": True}
    assert await store.get_request("r-3") is None
    assert rows(db, "SELECT reply FROM requests WHERE request_id='r-1'") == [('{"ok":true}',)]


# ------------------------------------------------------------------------------------------------
# Event numbering and the outbox


async def test_event_numbers_continue_without_a_gap_after_a_reopen(db: Path) -> None:
    async with SQLiteStore(db) as store:
        await store.create_instance(new("wf-1", events=2))
        await store.add_alert({"alert": "x"})
        assert await seqs(store) == [1, 2, 3]
    async with SQLiteStore(db) as store:
        await store.commit(transition("wf-1"))
        assert await seqs(store) == [1, 2, 3, 4]
        items = await store.outbox_pending()
        assert [i.payload["seq"] for i in items] == [1, 2, 3, 4]
        assert [(i.kind, i.workflow_id) for i in items] == [
            ("event", "wf-1"),
            ("event", "wf-1"),
            ("alert", None),
            ("event", "wf-1"),
        ]
        await store.outbox_ack([4, 2])
    async with SQLiteStore(db) as store:
        await store.commit(transition("wf-1"))
        assert await seqs(store) == [1, 3, 5]  # the acked top is never reused


async def test_ack_remembers_the_highest_seq_not_the_last_given(db: Path) -> None:
    async with SQLiteStore(db) as store:
        await store.create_instance(new("wf-1", events=3))
        await store.outbox_ack([3, 1])
        await store.outbox_ack([2])
        await store.outbox_ack([])
        assert await store.outbox_count() == 0
    async with SQLiteStore(db) as store:
        await store.commit(transition("wf-1"))
        assert await seqs(store) == [4]  # a lower seq acked later does not lower the mark


async def test_reads_return_a_hundred_unless_told(store: SQLiteStore) -> None:
    await asyncio.gather(*(store.create_instance(new(f"wf-{i:03d}", events=1)) for i in range(101)))
    await store.add_alert({"alert": "x"})
    assert len(await store.list_instances()) == 100
    assert len(await store.list_instances(limit=101)) == 101
    assert len(await store.outbox_pending()) == 100
    assert len(await store.outbox_pending(limit=200)) == 102


async def test_outbox_paging(store: SQLiteStore) -> None:
    await store.create_instance(new("wf-1", events=5))
    assert [i.seq for i in await store.outbox_pending(limit=2)] == [1, 2]
    assert [i.seq for i in await store.outbox_pending(limit=2, after_seq=2)] == [3, 4]
    assert [i.seq for i in await store.outbox_pending(after_seq=4)] == [5]
    assert await store.outbox_count() == 5
    assert await store.outbox_last_seq() == 5


async def test_trim_under_the_cap_drops_nothing(db: Path, store: SQLiteStore) -> None:
    await store.create_instance(new("wf-1", events=3))
    assert await store.outbox_trim(3) == 0
    assert await store.outbox_trim(10) == 0
    assert await seqs(store) == [1, 2, 3]
    assert rows(db, "SELECT value FROM meta WHERE key='last_seq'") == []


async def test_trim_drops_finished_events_then_the_oldest_of_any(db: Path) -> None:
    async with SQLiteStore(db) as store:
        await store.create_instance(new("live", events=3))  # seqs 1-3
        await store.create_instance(new("done", events=2))  # seqs 4-5
        await store.commit(transition("done", S.COMPLETED))  # seq 6
        await store.add_alert({"alert": "a"}, "done")  # seq 7: an alert of a finished one
        assert [(i.kind, i.workflow_id) for i in await store.outbox_pending(after_seq=5)] == [
            ("event", "done"),
            ("alert", "done"),
        ]
        # The finished workflow's events go first, oldest first.
        assert await store.outbox_trim(6) == 1
        assert await seqs(store) == [1, 2, 3, 5, 6, 7]
        assert await store.outbox_trim(5) == 1
        assert await seqs(store) == [1, 2, 3, 6, 7]
        # Then the last finished event, then the fallback pass takes the oldest of any kind.
        assert await store.outbox_trim(2) == 3
        assert await seqs(store) == [3, 7]
        assert await store.outbox_trim(0) == 2
        assert await seqs(store) == []
    async with SQLiteStore(db) as store:
        await store.commit(transition("live"))
        assert await seqs(store) == [8]  # trimmed numbers are not reused


# ------------------------------------------------------------------------------------------------
# Prune


async def finished(store: SQLiteStore, wid: str, at: float, **kw: Any) -> None:
    await store.create_instance(new(wid, at=at - 1, **kw))
    await store.commit(transition(wid, S.COMPLETED, at=at))


async def test_prune_raises_the_seq_mark_before_deleting_events(db: Path) -> None:
    async with SQLiteStore(db) as store:
        await finished(store, "old", 10.0)  # seqs 1-2, never published
        assert await store.prune(max_finished=0, now=20.0) == ["old"]
        assert await seqs(store) == []
    async with SQLiteStore(db) as store:
        await store.create_instance(new("new"))
        assert await seqs(store) == [3]


async def test_prune_of_instances_made_before_a_reopen(db: Path) -> None:
    async with SQLiteStore(db) as store:
        await finished(store, "old", 10.0)
    async with SQLiteStore(db) as store:
        assert await store.prune(max_finished=0, now=20.0) == ["old"]
        assert await store.list_instances() == []


async def test_prune_that_removes_nothing_leaves_the_seq_mark(db: Path, store: SQLiteStore) -> None:
    await store.create_instance(new("live"))
    assert await store.prune(max_finished=0, now=20.0) == []
    assert rows(db, "SELECT value FROM meta WHERE key='last_seq'") == []


async def test_prune_by_age_and_count(db: Path, store: SQLiteStore) -> None:
    for i, at in enumerate((10.0, 20.0, 30.0, 40.0)):
        await finished(store, f"f{i}", at)
    await store.create_instance(new("live", at=1.0))
    await store.commit(transition("live", S.ACTIVE, at=2.0))
    # finished_at < now - max_age: f0 (10) and f1 (20) for 45 - 25 = 20 is only f0.
    assert await store.prune(max_age=25, now=45.0) == ["f0"]
    assert await store.prune(max_finished=2, now=45.0) == ["f1"]
    # Either limit dooms: f2 is too old (30 < 40), and beyond the newest one.
    assert await store.prune(max_age=5, max_finished=1, now=45.0) == ["f2"]
    assert await store.prune(max_age=5, max_finished=0, now=45.0) == ["f3"]
    assert [r.id for r in await store.list_instances()] == ["live"]
    assert rows(db, "SELECT DISTINCT workflow_id FROM outbox") == [("live",)]
    assert rows(db, "SELECT count(*) FROM journal") == [(0,)]


async def test_prune_deletes_the_journal_of_pruned_instances_only(store: SQLiteStore) -> None:
    step = (JournalStart(1, "One", "forward", 1, 1.0),)
    await store.create_instance(new("keep", journal=step))
    await finished(store, "gone", 5.0, journal=step)
    await finished(store, "kept", 6.0, journal=step)
    assert await store.prune(max_finished=1, now=10.0) == ["gone"]
    assert len(await store.journal("keep")) == 1
    assert len(await store.journal("kept")) == 1
    assert await store.journal("gone") == []


async def test_prune_keeps_the_replies_of_kept_workflows(db: Path, store: SQLiteStore) -> None:
    await finished(store, "gone", 5.0, request=("r-gone", {"ok": True, "workflow_id": "gone"}))
    await finished(store, "kept", 6.0, request=("r-kept", {"ok": True, "workflow_id": "kept"}))
    await store.put_request("r-free", {"ok": True})  # a reply of no workflow, made now
    assert await store.prune(max_finished=1, now=time.time()) == ["gone"]
    assert await store.get_request("r-gone") is None
    assert await store.get_request("r-kept") == {"ok": True, "workflow_id": "kept"}
    assert await store.get_request("r-free") == {"ok": True}
    # Replies older than the age limit (30 days without one) go, whatever they answered.
    assert await store.prune(now=time.time() + 30 * 86400 - 10) == []
    assert rows(db, "SELECT request_id FROM requests ORDER BY 1") == [("r-free",), ("r-kept",)]
    assert await store.prune(now=time.time() + 30 * 86400 + 10) == []
    assert rows(db, "SELECT request_id FROM requests") == []


async def test_prune_by_age_drops_replies_older_than_the_age(store: SQLiteStore) -> None:
    await store.put_request("r-1", {"ok": True})
    assert await store.prune(max_age=3600, now=time.time() + 1800) == []
    assert await store.get_request("r-1") == {"ok": True}
    assert await store.prune(max_age=3600, now=time.time() + 7200) == []
    assert await store.get_request("r-1") is None


async def test_prune_drops_definitions_no_instance_uses(db: Path, store: SQLiteStore) -> None:
    await finished(store, "gone", 5.0, workflow_type="Old")
    await store.create_instance(new("live", workflow_type="Alpha"))
    assert await store.prune(max_finished=0, now=10.0) == ["gone"]
    assert rows(db, "SELECT hash FROM definitions") == [("hash-Alpha",)]


async def test_a_pruned_id_can_be_created_again(store: SQLiteStore) -> None:
    """The id-to-row cache forgets a pruned instance: a new one with its id gets its own row."""
    await finished(store, "wf-1", 5.0)
    await store.prune(max_finished=0, now=10.0)
    assert await store.create_instance(new("wf-1", workflow_type="Beta")) is True
    await store.commit(transition("wf-1", S.PAUSED, at=50.0))
    record = await store.load_instance("wf-1")
    assert record is not None
    assert (record.workflow_type, record.status) == ("Beta", S.PAUSED)


async def test_prune_in_chunks_of_many(store: SQLiteStore) -> None:
    """More ids than two of the chunks of 500 that prune deletes at a time."""
    many = 1001
    await asyncio.gather(*(finished(store, f"f{i:04d}", 5.0 + i) for i in range(many)))
    await store.create_instance(new("live"))
    pruned = await store.prune(max_finished=0, now=1e6)
    assert pruned == sorted(f"f{i:04d}" for i in range(many))
    assert [r.id for r in await store.list_instances()] == ["live"]
    assert await seqs(store) == [2 * many + 1]


async def test_checkpoint_and_ping(db: Path, store: SQLiteStore) -> None:
    await store.create_instance(new("wf-1"))
    await store.checkpoint()
    assert (db.parent / "edgesaga.db-wal").stat().st_size == 0
    assert await store.ping() is True
