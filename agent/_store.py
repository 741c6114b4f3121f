"""The durable store: the workflow journal's domain SQL on one SQLite file.

What a transition commits (the instance row, its journal rows, its outbox events), the reads the
engine, control and recovery make, request-id replies, the outbox and retention. The writer
thread and its group commit are ``agent._writer``'s; the schema and its migrations
``agent._schema``'s; the record shapes ``agent._records``'. The names other modules have always
imported from here still are.
"""

from __future__ import annotations

import base64
import binascii
import heapq
import itertools
import json
import logging
import math
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

from agent._errors import StoreError
from agent._records import (
    InstanceRecord,
    JournalEnd,
    JournalEntry,
    JournalStart,
    NewInstance,
    OutboxItem,
    Transition,
    dumps,
    iso,
    stored_event,
    whole_event,
)
from agent._schema import (
    _MIGRATIONS,
    AUTO_VACUUM_INCREMENTAL,
    JOURNAL_SPAN,
    RESUMABLE_SQL,
    SCHEMA_VERSION,
)
from agent._status import WorkflowStatus
from agent._writer import GroupWriter

# What other modules import from here (the records, the schema's version and migrations for the
# tests) stays importable from here.
__all__ = [
    "COMMAND_HASH",
    "FINISHED",
    "SCHEMA_VERSION",
    "_MIGRATIONS",
    "InstanceRecord",
    "JournalEnd",
    "JournalEntry",
    "JournalStart",
    "MemoryStore",
    "NewInstance",
    "OutboxItem",
    "SQLiteStore",
    "Transition",
    "dumps",
    "iso",
]

#: The key under which a reply handed to the store carries its command's hash (the store moves it
#: to its own column: it is never part of a reply sent).
COMMAND_HASH = "_command_hash"
#: The key under which a start's reply may carry its schedule fire, ``[schedule, slot key]``, for
#: :meth:`SQLiteStore.create_instance` to record (and drop from the stored reply), as
#: :data:`COMMAND_HASH` carries the command's hash: the scheduler starts its workflows through the
#: same path as a start command.
SCHEDULE_FIRE = "_schedule_fire"

_FIRED_SINCE = "SELECT 1 FROM schedule_fires WHERE schedule = ? AND slot >= ? LIMIT 1"
_DROP_OLDER_FIRES = "DELETE FROM schedule_fires WHERE schedule = ? AND slot < ?"
_INSERT_FIRE = "INSERT INTO schedule_fires(schedule, slot, workflow_id) VALUES (?,?,?)"
_LAST_FIRE = (
    "SELECT f.slot, f.workflow_id, i.status FROM schedule_fires f "
    "LEFT JOIN instances i ON i.id = f.workflow_id "
    "WHERE f.schedule = ? ORDER BY f.slot DESC LIMIT 1"
)

log = logging.getLogger("edgesaga.store")


class LastFire(NamedTuple):
    """A schedule's latest fire: its slot key, its workflow, and that workflow's status (None
    when the workflow is gone: retention prunes only finished ones)."""

    slot: str
    workflow_id: str
    status: WorkflowStatus | None

    @property
    def unfinished(self) -> bool:
        return self.status is not None and not self.status.is_terminal


def _fire_of(
    new: NewInstance,
) -> tuple[tuple[str, dict[str, Any]] | None, tuple[str, str] | None]:
    """The instance's request (its reply without :data:`SCHEDULE_FIRE`) and its fire: the
    NewInstance's own, else the one its reply carries."""
    request, fire = new.request, new.fire
    if request is not None and SCHEDULE_FIRE in request[1]:
        reply = dict(request[1])
        carried = reply.pop(SCHEDULE_FIRE)
        request = (request[0], reply)
        if fire is None:
            fire = (str(carried[0]), str(carried[1]))
    return request, fire


FINISHED = tuple(
    s.value
    for s in (
        WorkflowStatus.COMPLETED,
        WorkflowStatus.FAILED,
        WorkflowStatus.FAILED_ROLLED_BACK,
        WorkflowStatus.COMPENSATION_FAILED,
        WorkflowStatus.CANCELLED,
    )
)

#: A transition's instance row in two statements: what every step changes, then its status and
#: finished_at only when they change, so the indexes on status are written when a workflow changes
#: status, not at every step (an UPDATE naming an indexed column rewrites its index entry).
_UPDATE_INSTANCE = (
    "UPDATE instances SET current_step=?, error=?, state=?, progress=?, updated_at=? WHERE n=?"
)
_UPDATE_STATUS = (
    "UPDATE instances SET status=?1, finished_at=?2 WHERE n=?3 "
    "AND (status IS NOT ?1 OR finished_at IS NOT ?2)"
)
_INSERT_JOURNAL = (
    "INSERT INTO journal(k, n, seq, step, phase, attempt, outcome, started_at)"
    f" VALUES (?1 * {JOURNAL_SPAN} + ?2, ?1, ?2, ?3, ?4, ?5, 'started', ?6)"
)
_END_JOURNAL = (
    "UPDATE journal SET outcome=?1, ended_at=?2, error=?3, outputs=?6"
    f" WHERE k = ?4 * {JOURNAL_SPAN} + ?5"
)
#: An instance and its journal rows (the rows keyed within its span).
_JOURNAL_OF = (
    "instances i JOIN journal j "
    f"ON j.k BETWEEN i.n * {JOURNAL_SPAN} AND i.n * {JOURNAL_SPAN} + {JOURNAL_SPAN - 1}"
)
#: An event row keeps its instance's number (n) beside its id: the index a prune deletes a
#: workflow's events by is then ordered as the events are made (small, appended at its end).
_INSERT_EVENT = "INSERT INTO outbox(seq, kind, workflow_id, payload, n) VALUES (?,?,?,?,?)"
_COLUMNS = (
    "i.id, i.workflow_type, i.definition_hash, i.status, i.current_step, i.error, i.state, "
    "i.progress, i.created_at, i.updated_at"
)
#: The most instances one ``list_page`` returns, and one ``resumable_page``.
LIST_LIMIT_MAX = 1000
RESUMABLE_PAGE_MAX = 10_000

# Recovery walks the partial index of resumable instances (named: the planner would rather take
# the status index and sort all it finds by n; its statuses are literals, as the index is
# declared), and each one's journal rows by their key range.
_MARK_INTERRUPTED = (
    "UPDATE journal SET outcome = 'interrupted', ended_at = ?1, error = ?2 WHERE k IN "
    "(SELECT j.k FROM instances i INDEXED BY instances_resumable "
    f"JOIN journal j ON j.k BETWEEN i.n * {JOURNAL_SPAN} AND i.n * {JOURNAL_SPAN} + "
    f"{JOURNAL_SPAN - 1} WHERE i.status IN {RESUMABLE_SQL} AND +j.outcome = 'started')"
)
_RESUMABLE_PAGE = (
    f"SELECT i.n, {_COLUMNS}, d.body FROM instances i INDEXED BY instances_resumable "
    "JOIN definitions d "
    f"ON d.hash = i.definition_hash WHERE i.status IN {RESUMABLE_SQL} AND i.n > ? "
    "ORDER BY i.n LIMIT ?"
)

# Retention walks the finished instances by (finished_at, n) on the partial index of finished
# ones: the newest kept one's key, then slices of the older ones. (``+status``: the status is
# checked on each row the walk finds, never looked up in a status index, whose order is not the
# walk's.)
_FINISHED_SQL = "(" + ",".join(f"'{s}'" for s in FINISHED) + ")"
_OLDEST_KEPT = (
    "SELECT finished_at, n FROM instances WHERE finished_at IS NOT NULL AND +status IN "
    f"{_FINISHED_SQL} ORDER BY finished_at DESC, n DESC LIMIT 1 OFFSET ?"
)
_DOOMED = (
    "SELECT n, id, finished_at FROM instances WHERE finished_at IS NOT NULL AND +status IN "
    f"{_FINISHED_SQL} AND finished_at >= ?1 AND (finished_at, n) > (?1, ?2) "
    "AND finished_at <= ?3 AND (finished_at, n) < (?3, ?4) ORDER BY finished_at, n LIMIT ?5"
)
_BEFORE_ALL = (-math.inf, 0)
_DELETE_JOURNAL = (
    f"DELETE FROM journal WHERE k BETWEEN ?1 * {JOURNAL_SPAN} "
    f"AND ?1 * {JOURNAL_SPAN} + {JOURNAL_SPAN - 1}"
)
_DROP_UNUSED_DEFINITIONS = (
    "DELETE FROM definitions WHERE NOT EXISTS "
    "(SELECT 1 FROM instances i WHERE i.definition_hash = definitions.hash)"
)
_DROP_OLD_REQUESTS = (
    "DELETE FROM requests WHERE rowid IN "
    "(SELECT rowid FROM requests WHERE created_at < ? ORDER BY created_at LIMIT ?)"
)


def _instance_columns(tr: Transition) -> tuple[Any, ...]:
    """What a transition sets on its instance row: status, current_step, error, state, progress
    and updated_at, in that order (both the INSERT and the UPDATE list them so)."""
    return (tr.status.value, tr.current_step, tr.error, tr.state_json, tr.progress_json, tr.at)


def encode_cursor(record: InstanceRecord) -> str:
    """The cursor that continues a list after ``record`` (opaque: its creation time and id)."""
    text = f"{record.created_at!r}:{record.id}"
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, str]:
    """The (created_at, id) a cursor of ``encode_cursor`` holds; ValueError for any other."""
    bad = ValueError("That cursor is not one this agent gave; start again without --cursor.")
    if not isinstance(cursor, str) or not 0 < len(cursor) <= 400:
        raise bad
    try:
        raw = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True)
        at, workflow_id = raw.decode().split(":", 1)
        created_at = float(at)
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise bad from None
    if not math.isfinite(created_at) or not workflow_id:
        raise bad
    return created_at, workflow_id


def _newest_first(row: Sequence[Any]) -> tuple[float, str]:
    return -row[8], row[0]  # created_at descending, then id


class _ListQuery(NamedTuple):
    """A list's filters as SQL that walks an index newest first: one query per status asked for
    (the status indexes are ordered by creation time within a status), merged."""

    lanes: tuple[str | None, ...]  # a status each; None: any status
    workflow_type: str | None
    created_after: float | None
    created_before: float | None

    @classmethod
    def of(
        cls,
        status: Iterable[str] | str | None,
        workflow_type: str | None,
        created_after: float | None,
        created_before: float | None,
    ) -> _ListQuery:
        statuses = [status] if isinstance(status, str) else list(status or [])
        lanes: tuple[str | None, ...] = tuple(
            dict.fromkeys(WorkflowStatus(s).value for s in statuses)
        )
        for bound in (created_after, created_before):
            if bound is not None and not math.isfinite(bound):
                raise ValueError(f"A creation time bound must be a finite number; got {bound}.")
        if workflow_type and not lanes:  # the type index is ordered by status first
            lanes = tuple(s.value for s in WorkflowStatus)
        return cls(lanes or (None,), workflow_type or None, created_after, created_before)

    def rows(
        self, conn: sqlite3.Connection, after: tuple[float, str] | None, limit: int
    ) -> list[Any]:
        any_status = self.lanes == (None,)
        terms, args = self._terms(after)
        if not any_status:
            terms.insert(0, "i.status = ?")
        where = " WHERE " + " AND ".join(terms) if terms else ""
        sql = f"SELECT {_COLUMNS} FROM instances i{where} ORDER BY i.created_at DESC, i.id LIMIT ?"
        if any_status:
            return conn.execute(sql, (*args, limit)).fetchall()
        lanes: list[Iterator[Any]] = [conn.execute(sql, (s, *args, limit)) for s in self.lanes]
        return list(itertools.islice(heapq.merge(*lanes, key=_newest_first), limit))

    def _terms(self, after: tuple[float, str] | None) -> tuple[list[str], list[Any]]:
        terms: list[str] = []
        args: list[Any] = []
        if self.workflow_type is not None:
            terms.append("i.workflow_type = ?")
            args.append(self.workflow_type)
        if self.created_after is not None:
            terms.append("i.created_at > ?")
            args.append(self.created_after)
        if self.created_before is not None:
            terms.append("i.created_at < ?")
            args.append(self.created_before)
        if after is not None:  # keyset: what sorts after the last row of the page before
            terms.append("i.created_at <= ? AND (i.created_at < ? OR i.id > ?)")
            args.extend((after[0], after[0], after[1]))
        return terms, args


def _prune_bound(
    conn: sqlite3.Connection, max_age: float | None, max_finished: int | None, now: float
) -> tuple[float, int] | None:
    """The (finished_at, n) key before which every finished instance is to go (both limits doom
    a prefix of the finished instances in that order, so together they doom the longer one), or
    None when there is no limit."""
    bounds: list[tuple[float, int]] = []
    if max_age is not None:
        bounds.append((now - max_age, -1))  # finished_at < now - max_age (every n is positive)
    if max_finished is not None:
        if max_finished <= 0:
            bounds.append((math.inf, 0))
        else:
            row = conn.execute(_OLDEST_KEPT, (max_finished - 1,)).fetchone()
            if row is not None:
                bounds.append((row[0], row[1]))
    return max(bounds) if bounds else None


def _vacuum_slice(conn: sqlite3.Connection, max_pages: int, seconds: float) -> tuple[int, int]:
    """One incremental vacuum of at most ``max_pages`` pages, for about ``seconds``: the pages it
    freed and the free pages left (0 and 0 on a database without incremental auto-vacuum)."""
    if conn.execute("PRAGMA auto_vacuum").fetchone()[0] != AUTO_VACUUM_INCREMENTAL:
        return 0, 0
    before: int = conn.execute("PRAGMA freelist_count").fetchone()[0]
    deadline = time.monotonic() + seconds
    # Each step of the pragma frees one page, and the sqlite3 module steps a pragma that returns
    # no rows only once: so one execution per page. A page can take 0.2 ms to move: the clock is
    # read every 10 so that a slice overruns ``seconds`` by a few ms at most (every 50 overran it
    # by up to 15 ms, measured in bench/history.py).
    for done in range(1, min(before, max_pages) + 1):
        conn.execute("PRAGMA incremental_vacuum")
        if done % 10 == 0 and time.monotonic() > deadline:
            break
    after: int = conn.execute("PRAGMA freelist_count").fetchone()[0]
    return before - after, after


class SQLiteStore(GroupWriter):
    """The durable store on one SQLite file (async context manager).

    WAL mode, ``synchronous=FULL``, one writer connection on one thread, ``BEGIN IMMEDIATE``,
    ``PRAGMA user_version`` migrations. By default it takes an exclusive lock on the database file
    so only one process drives it; ``readonly=True`` opens it for reading only.
    """

    #: About how long one write of a prune deletes for (then the rest waits for the next one).
    prune_slice_seconds = 0.02
    #: About how long one write of ``reclaim`` moves pages for.
    reclaim_slice_seconds = 0.02

    # -- what the writer asks of its domain ------------------------------------------------------
    def _fresh(self) -> None:
        self._next_seq = 1  # the next outbox seq (store thread only)
        self._keys: dict[str, int] = {}  # workflow id -> instances.n (store thread only)

    def _opened(self, conn: sqlite3.Connection) -> None:
        self._next_seq = self._load_next_seq(conn)

    def _load_next_seq(self, conn: sqlite3.Connection) -> int:
        top = conn.execute("SELECT max(seq) FROM outbox").fetchone()[0] or 0
        row = conn.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone()
        acked = int(row[0]) if row else 0
        return max(top, acked) + 1

    def _mark(self) -> int:
        return self._next_seq

    def _undo(self, mark: int) -> None:
        self._next_seq = mark  # keep event numbers gap-free
        self._keys.clear()  # a rolled-back insert may have cached a key

    # -- pragmas (tests) ----------------------------------------------------------------------------
    async def pragmas(self) -> dict[str, Any]:
        """journal_mode, synchronous (2 = FULL), foreign_keys, user_version, page_size,
        wal_autocheckpoint and auto_vacuum (2 = INCREMENTAL)."""

        def q(conn: sqlite3.Connection) -> dict[str, Any]:
            return {
                name: conn.execute(f"PRAGMA {name}").fetchone()[0]
                for name in (
                    "journal_mode",
                    "synchronous",
                    "foreign_keys",
                    "user_version",
                    "page_size",
                    "wal_autocheckpoint",
                    "auto_vacuum",
                )
            }

        return await self.read(q)

    # -- writes ------------------------------------------------------------------------------------
    def _key(self, conn: sqlite3.Connection, workflow_id: str) -> int:
        n = self._find_key(conn, workflow_id)
        if n is None:
            raise StoreError(f"Workflow {workflow_id} is not in the database (pruned?).")
        return n

    def _find_key(self, conn: sqlite3.Connection, workflow_id: str) -> int | None:
        """The number (``instances.n``) of a workflow, or None when it is not in the database."""
        n = self._keys.get(workflow_id)
        if n is None:
            row = conn.execute("SELECT n FROM instances WHERE id=?", (workflow_id,)).fetchone()
            if row is None:
                return None
            if len(self._keys) > 10_000:
                self._keys.clear()
            n = self._keys[workflow_id] = row[0]
        return n

    def _apply(self, conn: sqlite3.Connection, tr: Transition) -> None:
        self._apply_many(conn, [tr])

    def _apply_many(self, conn: sqlite3.Connection, transitions: list[Transition]) -> None:
        """Commit transitions of one or several workflows: their instance rows, journal rows and
        outbox events, with one ``executemany`` per statement."""
        updates = []
        statuses = []
        starts: list[tuple[Any, ...]] = []
        ends: list[tuple[Any, ...]] = []
        events: list[tuple[Any, ...]] = []
        for tr in transitions:
            n = self._key(conn, tr.workflow_id)
            updates.append((*_instance_columns(tr)[1:], n))
            status = tr.status.value
            statuses.append((status, tr.at if status in FINISHED else None, n))
            self._journal_rows(n, tr, starts, ends)
            self._event_rows(tr.workflow_id, n, tr.events, events)
        cur = conn.executemany(_UPDATE_INSTANCE, updates)
        if cur.rowcount != len(updates):
            ids = ", ".join(tr.workflow_id for tr in transitions)
            raise StoreError(f"Workflow {ids} is not in the database (pruned?).")
        conn.executemany(_UPDATE_STATUS, statuses)
        self._write_rows(conn, starts, ends, events)

    def _append(self, conn: sqlite3.Connection, n: int, tr: Transition) -> None:
        """The journal rows and outbox events of a transition."""
        starts: list[tuple[Any, ...]] = []
        ends: list[tuple[Any, ...]] = []
        events: list[tuple[Any, ...]] = []
        self._journal_rows(n, tr, starts, ends)
        self._event_rows(tr.workflow_id, n, tr.events, events)
        self._write_rows(conn, starts, ends, events)

    @staticmethod
    def _journal_rows(
        n: int, tr: Transition, starts: list[tuple[Any, ...]], ends: list[tuple[Any, ...]]
    ) -> None:
        for op in tr.journal:
            if isinstance(op, JournalStart):
                starts.append((n, op.seq, op.step, op.phase, op.attempt, op.at))
            else:
                ends.append((op.outcome, op.at, op.error, n, op.seq, op.outputs))

    def _event_rows(
        self,
        workflow_id: str | None,
        n: int | None,
        events: Iterable[tuple[str, dict[str, Any]]],
        rows: list[tuple[Any, ...]],
    ) -> None:
        """Number the events (``payload["seq"]``) and add their outbox rows to ``rows``."""
        for kind, payload in events:
            seq = self._next_seq
            self._next_seq += 1
            payload["seq"] = seq
            rows.append((seq, kind, workflow_id, stored_event(kind, payload), n))

    @staticmethod
    def _write_rows(
        conn: sqlite3.Connection,
        starts: list[tuple[Any, ...]],
        ends: list[tuple[Any, ...]],
        events: list[tuple[Any, ...]],
    ) -> None:
        if starts:  # before the ends: an end may follow its start
            conn.executemany(_INSERT_JOURNAL, starts)
        if ends:
            conn.executemany(_END_JOURNAL, ends)
        if events:
            conn.executemany(_INSERT_EVENT, events)

    def _insert_events(
        self,
        conn: sqlite3.Connection,
        workflow_id: str | None,
        events: Iterable[tuple[str, dict[str, Any]]],
    ) -> None:
        rows: list[tuple[Any, ...]] = []
        n = None if workflow_id is None else self._find_key(conn, workflow_id)
        self._event_rows(workflow_id, n, events, rows)
        conn.executemany(_INSERT_EVENT, rows)

    def _create(self, conn: sqlite3.Connection, new: NewInstance) -> bool:
        if conn.execute("SELECT 1 FROM instances WHERE id=?", (new.id,)).fetchone():
            return False
        request, fire = _fire_of(new)
        if fire is not None:
            schedule, slot = fire
            # A slot at or before the schedule's latest fire never fires (again): not the same
            # slot twice, nor an earlier one after the wall clock jumped back.
            if conn.execute(_FIRED_SINCE, (schedule, slot)).fetchone():
                return False
            conn.execute(_DROP_OLDER_FIRES, (schedule, slot))  # only the latest one is asked for
            conn.execute(_INSERT_FIRE, (schedule, slot, new.id))
        conn.execute(
            "INSERT OR IGNORE INTO definitions(hash, workflow_type, workflow_version, body) "
            "VALUES (?,?,?,?)",
            (new.definition_hash, new.workflow_type, new.workflow_version, new.definition),
        )
        tr = new.first
        cur = conn.execute(
            "INSERT INTO instances(id, workflow_type, definition_hash, status, current_step, "
            "error, state, progress, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (new.id, new.workflow_type, new.definition_hash, *_instance_columns(tr), tr.at),
        )
        n = cur.lastrowid  # the row an INSERT just wrote: never None
        assert n is not None
        self._keys[new.id] = n
        self._append(conn, n, tr)
        if request is not None:
            self._put_request(conn, *request)
        return True

    async def create_instance(self, new: NewInstance) -> bool:
        """Insert a new instance (and its definition snapshot, first transition, events,
        request-id reply and schedule fire) in one transaction. Returns False, writing nothing,
        when an instance with that id already exists, or when the fire's schedule has already
        fired at or after its slot."""

        return await self.write(lambda conn: self._create(conn, new))

    async def commit(self, transition: Transition) -> None:
        """Commit one transition (instance row, journal rows, outbox events) atomically."""
        await self._call(
            lambda conn: self._apply(conn, transition), write=True, transition=transition
        )

    async def add_alert(self, payload: dict[str, Any], workflow_id: str | None = None) -> None:
        """Queue an alert (kind ``alert``) in the outbox."""
        await self.write(lambda conn: self._insert_events(conn, workflow_id, [("alert", payload)]))

    # -- request ids -------------------------------------------------------------------------------
    @staticmethod
    def _put_request(
        conn: sqlite3.Connection,
        request_id: str,
        reply: dict[str, Any],
        command_hash: str | None = None,
    ) -> None:
        if COMMAND_HASH in reply:
            reply = dict(reply)
            command_hash = reply.pop(COMMAND_HASH)
        workflow_id = reply.get("workflow_id")
        conn.execute(
            "INSERT OR IGNORE INTO requests(request_id, reply, created_at, command_hash, "
            "workflow_id) VALUES (?,?,?,?,?)",
            (
                request_id,
                dumps(reply),
                time.time(),
                command_hash,
                workflow_id if isinstance(workflow_id, str) else None,
            ),
        )

    async def put_request(
        self, request_id: str, reply: dict[str, Any], command_hash: str | None = None
    ) -> None:
        """Remember the reply to ``request_id`` and the hash of the command it answered (the
        first one wins)."""
        await self.write(lambda conn: self._put_request(conn, request_id, reply, command_hash))

    async def lookup_request(self, request_id: str) -> tuple[dict[str, Any], str | None] | None:
        """The stored reply to ``request_id`` and its command's hash (None when it was stored
        before hashes were), or None."""

        def fn(conn: sqlite3.Connection) -> tuple[dict[str, Any], str | None] | None:
            row = conn.execute(
                "SELECT reply, command_hash FROM requests WHERE request_id=?", (request_id,)
            ).fetchone()
            return (json.loads(row[0]), row[1]) if row else None

        return await self.query(fn)

    async def get_request(self, request_id: str) -> dict[str, Any] | None:
        """The stored reply to ``request_id``, or None."""
        found = await self.lookup_request(request_id)
        return None if found is None else found[0]

    # -- reads -------------------------------------------------------------------------------------
    @staticmethod
    def _record(row: Sequence[Any], definition: str | None = None) -> InstanceRecord:
        return InstanceRecord(
            id=row[0],
            workflow_type=row[1],
            definition_hash=row[2],
            status=WorkflowStatus(row[3]),
            current_step=row[4],
            error=row[5],
            state=json.loads(row[6]),
            progress=json.loads(row[7]),
            created_at=row[8],
            updated_at=row[9],
            definition=definition,
        )

    _COLUMNS = _COLUMNS

    async def load_instance(self, workflow_id: str) -> InstanceRecord | None:
        """One instance with its definition snapshot, or None."""

        def fn(conn: sqlite3.Connection) -> InstanceRecord | None:
            row = conn.execute(
                f"SELECT {self._COLUMNS}, d.body FROM instances i "
                "JOIN definitions d ON d.hash = i.definition_hash WHERE i.id = ?",
                (workflow_id,),
            ).fetchone()
            return self._record(row, row[10]) if row else None

        return await self.query(fn)

    #: The most ids one ``load_instances`` takes (one statement's bound parameters).
    LOAD_INSTANCES_MAX = 500

    async def load_instances(self, workflow_ids: Iterable[str]) -> dict[str, InstanceRecord]:
        """The instances ``workflow_ids`` with their definition snapshots, by id, read with one
        query on the reader connection; an id with no instance is left out. At most
        ``LOAD_INSTANCES_MAX`` ids: a caller with more reads them a page at a time."""
        ids = list(dict.fromkeys(workflow_ids))
        if len(ids) > self.LOAD_INSTANCES_MAX:
            raise ValueError(
                f"At most {self.LOAD_INSTANCES_MAX} instances are loaded at once; got {len(ids)} "
                "ids. Load them a page at a time."
            )
        if not ids:
            return {}
        sql = (
            f"SELECT {self._COLUMNS}, d.body FROM instances i JOIN definitions d "
            f"ON d.hash = i.definition_hash WHERE i.id IN ({','.join('?' * len(ids))})"
        )
        return await self.query(
            lambda conn: {row[0]: self._record(row, row[10]) for row in conn.execute(sql, ids)}
        )

    async def list_page(
        self,
        *,
        status: Iterable[str] | str | None = None,
        workflow_type: str | None = None,
        created_after: float | None = None,
        created_before: float | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> tuple[list[InstanceRecord], str | None]:
        """One page of instances, newest first (``created_at`` descending, then id), filtered by
        status (one or several), type and creation time (``created_after < created_at <
        created_before``); with the cursor that continues it, or None after the last page.

        ``cursor`` is one a page returned (with the same filters); each page costs what it
        returns, however long the history."""
        if not isinstance(limit, int) or not 1 <= limit <= LIST_LIMIT_MAX:
            raise ValueError(f"The limit must be between 1 and {LIST_LIMIT_MAX}; got {limit!r}.")
        after = None if cursor is None else decode_cursor(cursor)
        query = _ListQuery.of(status, workflow_type, created_after, created_before)
        rows = await self.query(lambda conn: query.rows(conn, after, limit + 1))
        records = [self._record(r) for r in rows[:limit]]
        more = len(rows) > limit
        return records, encode_cursor(records[-1]) if more else None

    async def list_instances(
        self,
        *,
        status: Iterable[str] | str | None = None,
        workflow_type: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[InstanceRecord]:
        """Instances, newest first, optionally filtered by status and type (the SQL of
        ``list_page``, any limit)."""
        query = _ListQuery.of(status, workflow_type, None, None)
        rows = await self.query(lambda conn: query.rows(conn, None, limit + offset))
        return [self._record(r) for r in rows[offset : offset + limit]]

    async def last_fires(self, schedules: Iterable[str]) -> dict[str, LastFire]:
        """The latest fire of each of ``schedules`` that has fired: its slot key, its workflow and
        that workflow's status (None once retention pruned it: it had finished). One search of
        the fires' primary key and one of the instances' per schedule."""
        names = list(schedules)

        def fn(conn: sqlite3.Connection) -> dict[str, LastFire]:
            found: dict[str, LastFire] = {}
            for name in names:
                row = conn.execute(_LAST_FIRE, (name,)).fetchone()
                if row is not None:
                    status = row[2]
                    found[name] = LastFire(
                        row[0], row[1], None if status is None else WorkflowStatus(status)
                    )
            return found

        return await self.query(fn)

    async def count_by_status(self, statuses: Iterable[str] | None = None) -> dict[str, int]:
        """How many instances have each status (only ``statuses``, when given: each of those
        counts only its own entries of the status index)."""
        wanted = None if statuses is None else [WorkflowStatus(s).value for s in statuses]

        def fn(conn: sqlite3.Connection) -> dict[str, int]:
            if wanted is None:  # one pass over the status index (covering: no row is read)
                sql = "SELECT status, count(*) FROM instances GROUP BY status"
                return dict(conn.execute(sql).fetchall())
            counts = {
                s: conn.execute("SELECT count(*) FROM instances WHERE status = ?", (s,)).fetchone()[
                    0
                ]
                for s in wanted
            }
            return {s: c for s, c in counts.items() if c}

        return await self.query(fn)

    async def journal(self, workflow_id: str) -> list[JournalEntry]:
        """Every step and compensation attempt of one instance, in order."""

        def fn(conn: sqlite3.Connection) -> list[JournalEntry]:
            rows = conn.execute(
                "SELECT i.id, j.seq, j.step, j.phase, j.attempt, j.outcome, j.started_at, "
                f"j.ended_at, j.error FROM {_JOURNAL_OF} WHERE i.id = ? ORDER BY j.k",
                (workflow_id,),
            )
            return [JournalEntry(*r) for r in rows]

        return await self.query(fn)

    async def commanded_outputs(self, workflow_id: str) -> dict[str, dict[str, Any]]:
        """The output values each completed forward step of one instance commanded, by step and
        device (what its compensation puts back); the latest attempt of a step wins."""

        def fn(conn: sqlite3.Connection) -> dict[str, dict[str, Any]]:
            rows = conn.execute(
                f"SELECT j.step, j.outputs FROM {_JOURNAL_OF} WHERE i.id = ? AND j.phase = "
                "'forward' AND j.outcome = 'completed' AND j.outputs IS NOT NULL ORDER BY j.k",
                (workflow_id,),
            )
            return {step: json.loads(text) for step, text in rows}

        return await self.query(fn)

    # -- recovery ----------------------------------------------------------------------------------
    async def mark_interrupted_attempts(self, *, at: float, error: str) -> int:
        """Record every attempt still ``started`` of a resumable instance as ``interrupted`` (ended
        ``at``, with ``error``), in one write, and return how many. Run it before any workflow
        runs: it is what a restart finds of the attempts the agent died in."""

        def fn(conn: sqlite3.Connection) -> int:
            return conn.execute(_MARK_INTERRUPTED, (at, error)).rowcount

        return await self.write(fn)

    async def resumable_page(
        self, *, after_n: int = 0, limit: int = 256
    ) -> list[tuple[int, InstanceRecord]]:
        """The next ``limit`` resumable instances (ACTIVE, COMPENSATING) after the one numbered
        ``after_n``, in creation order, each with its definition snapshot and its number (the
        cursor for the next page)."""
        if not 1 <= limit <= RESUMABLE_PAGE_MAX:
            raise ValueError(f"The limit must be between 1 and {RESUMABLE_PAGE_MAX}; got {limit}.")

        def fn(conn: sqlite3.Connection) -> list[tuple[int, InstanceRecord]]:
            rows = conn.execute(_RESUMABLE_PAGE, (after_n, limit))
            return [(r[0], self._record(r[1:], r[11])) for r in rows]

        return await self.query(fn)

    async def commit_many(self, transitions: Sequence[Transition]) -> None:
        """Commit transitions of several workflows (one each) in one write."""
        if transitions:
            batch = list(transitions)
            await self.write(lambda conn: self._apply_many(conn, batch))

    # -- outbox ------------------------------------------------------------------------------------
    async def outbox_pending(self, limit: int = 100, after_seq: int = 0) -> list[OutboxItem]:
        """Unacknowledged events and alerts in ``seq`` order."""

        def fn(conn: sqlite3.Connection) -> list[OutboxItem]:
            rows = conn.execute(
                "SELECT o.seq, o.kind, o.workflow_id, o.payload, i.workflow_type FROM outbox o "
                "LEFT JOIN instances i ON i.id = o.workflow_id WHERE o.seq > ? ORDER BY o.seq "
                "LIMIT ?",
                (after_seq, limit),
            )
            return [OutboxItem(r[0], r[1], r[2], whole_event(*r)) for r in rows]

        return await self.query(fn)

    @staticmethod
    def _raise_last_seq(conn: sqlite3.Connection, seq: int) -> None:
        """Record the highest seq ever deleted, so numbers are never reused after a reopen."""
        conn.execute(
            "INSERT INTO meta(key, value) VALUES ('last_seq', ?) ON CONFLICT(key) DO UPDATE "
            "SET value = max(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))",
            (seq,),
        )

    async def outbox_ack(self, seqs: Iterable[int]) -> None:
        """Delete acknowledged items (the broker has them)."""
        seq_list = sorted(set(seqs))
        if not seq_list:
            return

        def fn(conn: sqlite3.Connection) -> None:
            conn.executemany("DELETE FROM outbox WHERE seq = ?", [(s,) for s in seq_list])
            self._raise_last_seq(conn, seq_list[-1])

        await self.write(fn)

    async def outbox_count(self) -> int:
        """How many items the outbox holds (counted on the reader: up to its cap of rows)."""
        return await self.query(
            lambda conn: conn.execute("SELECT count(*) FROM outbox").fetchone()[0]
        )

    async def outbox_last_seq(self) -> int:
        """The seq of the newest item still in the outbox (0 when it is empty)."""
        return await self.read(
            lambda conn: int(conn.execute("SELECT coalesce(max(seq), 0) FROM outbox").fetchone()[0])
        )

    async def outbox_trim(self, cap: int) -> int:
        """Keep at most ``cap`` outbox items: drop the oldest events of *finished* workflows first
        (then the oldest of any), and return how many were dropped."""

        def fn(conn: sqlite3.Connection) -> int:
            count, top = conn.execute("SELECT count(*), max(seq) FROM outbox").fetchone()
            excess = count - cap
            if excess <= 0:
                return 0
            # Remember the high-water mark, so seq numbers are never reused after a reopen.
            self._raise_last_seq(conn, top)
            marks = ",".join("?" * len(FINISHED))
            dropped = conn.execute(
                "DELETE FROM outbox WHERE seq IN (SELECT o.seq FROM outbox o JOIN instances i ON "
                f"i.id = o.workflow_id WHERE i.status IN ({marks}) AND o.kind = 'event' "
                "ORDER BY o.seq LIMIT ?)",
                (*FINISHED, excess),
            ).rowcount
            # Then the oldest of any (LIMIT 0 when the first pass dropped enough).
            return (
                dropped
                + conn.execute(
                    "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox ORDER BY seq LIMIT ?)",
                    (excess - dropped,),
                ).rowcount
            )

        return await self.write(fn)

    async def prune(
        self,
        *,
        max_age: float | None = None,
        max_finished: int | None = None,
        now: float | None = None,
        slice_rows: int = 200,
    ) -> list[str]:
        """Delete finished instances older than ``max_age`` seconds or beyond the newest
        ``max_finished``, with their journal, events and request-id replies, oldest first; then
        definitions no instance uses and replies older than ``max_age`` (30 days without it).
        Returns their ids.

        It works in slices, each its own small write of at most ``slice_rows`` instances (and
        ``prune_slice_seconds``), so workflow commits go in between."""
        if slice_rows < 1:
            raise ValueError(f"slice_rows must be at least 1; got {slice_rows}.")
        now = time.time() if now is None else now
        bound = await self.query(lambda conn: _prune_bound(conn, max_age, max_finished, now))
        pruned: list[str] = []
        after = _BEFORE_ALL
        while bound is not None:
            ids, last = await self._prune_slice(bound, after, slice_rows)
            if last is None:
                break
            pruned.extend(ids)
            after = last
            await self._fold_wal()
        await self.write(lambda conn: conn.execute(_DROP_UNUSED_DEFINITIONS).rowcount)
        cutoff = now - (max_age or 30 * 86400)
        while (
            await self.write(
                lambda conn: conn.execute(_DROP_OLD_REQUESTS, (cutoff, slice_rows)).rowcount
            )
            >= slice_rows
        ):
            pass  # a full slice of old replies went: there may be more
        return pruned

    async def prune_slice(
        self,
        *,
        max_age: float | None = None,
        max_finished: int | None = None,
        now: float | None = None,
        slice_rows: int = 200,
    ) -> list[str]:
        """One slice of ``prune``: the oldest (at most ``slice_rows``) of the instances it would
        delete, deleted in one write; [] when there are none."""
        now = time.time() if now is None else now
        bound = await self.query(lambda conn: _prune_bound(conn, max_age, max_finished, now))
        if bound is None:
            return []
        return (await self._prune_slice(bound, _BEFORE_ALL, slice_rows))[0]

    async def _prune_slice(
        self, bound: tuple[float, int], after: tuple[float, int], slice_rows: int
    ) -> tuple[list[str], tuple[float, int] | None]:
        """Delete finished instances keyed (finished_at, n) between ``after`` and ``bound``, the
        oldest first, at most ``slice_rows`` of them and for about ``prune_slice_seconds``; the
        ids deleted and the key of the last (None when there was none)."""

        def fn(conn: sqlite3.Connection) -> tuple[list[str], tuple[float, int] | None]:
            rows = conn.execute(_DOOMED, (*after, *bound, slice_rows)).fetchall()
            if not rows:
                return [], None
            top = conn.execute("SELECT max(seq) FROM outbox").fetchone()[0]
            if top is not None:
                self._raise_last_seq(conn, top)
            deadline = time.monotonic() + self.prune_slice_seconds
            done: list[tuple[int, str, float]] = []
            for start in range(0, len(rows), 50):
                part = rows[start : start + 50]
                ns = [(n,) for n, _, _ in part]
                ids = [(wid,) for _, wid, _ in part]
                conn.executemany(_DELETE_JOURNAL, ns)
                # their events (published or, with no broker, never to be) and request-id replies
                conn.executemany("DELETE FROM outbox WHERE n = ?", ns)
                conn.executemany("DELETE FROM requests WHERE workflow_id = ?", ids)
                conn.executemany("DELETE FROM instances WHERE n = ?", ns)
                done.extend(part)
                if time.monotonic() > deadline:
                    break
            for _, wid, _ in done:
                self._keys.pop(wid, None)
            n, _, finished_at = done[-1]
            return [wid for _, wid, _ in done], (finished_at, n)

        return await self.write(fn)

    async def reclaim(self, *, max_pages: int = 2000, max_slices: int | None = None) -> int:
        """Give the database's free pages (what prunes left) back to the file system: an
        incremental vacuum of at most ``max_pages`` pages per write, until none is left (or
        ``max_slices`` writes), then a checkpoint that folds the WAL in and truncates it.
        Each write also stops after about ``reclaim_slice_seconds``. Returns the pages freed (0
        on a database made without incremental auto-vacuum)."""
        if max_pages < 1:
            raise ValueError(f"max_pages must be at least 1; got {max_pages}.")
        freed = slices = 0
        seconds = self.reclaim_slice_seconds
        while max_slices is None or slices < max_slices:
            got, left = await self.write(lambda conn: _vacuum_slice(conn, max_pages, seconds))
            await self._fold_wal()
            slices += 1
            freed += got
            if not left or not got:
                break  # the free list is empty (or cannot be given back)
        await self.checkpoint()
        return freed

    async def _fold_wal(self) -> None:
        """Copy what the WAL holds into the database now, between two writes.

        A slice of a prune or a reclaim dirties about a thousand distinct pages. Left to the WAL
        auto-checkpoint, four slices' worth would be copied and flushed inside whichever commit
        crosses the threshold, often a running workflow's (measured in bench/history.py: the
        longest commit wait of a 100k prune 48-68 ms this way, 26-27 ms with a fold after each
        slice). A passive checkpoint never waits for readers. One that fails (a full disk) loses
        nothing: the pages stay in the WAL for the next checkpoint, so the prune goes on."""
        try:
            await self.read(lambda conn: conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall())
        except StoreError as exc:
            log.debug(
                "folding the WAL after a slice failed (left for the next checkpoint): %s", exc
            )

    async def checkpoint(self) -> None:
        """Fold the WAL back into the database file (after a prune, say)."""
        await self.read(lambda conn: conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall())

    async def ping(self) -> bool:
        """True when the store thread answers (the watchdog's health check)."""
        return await self.read(lambda conn: conn.execute("SELECT 1").fetchone()[0] == 1)


class MemoryStore(SQLiteStore):
    """The same store on an in-memory SQLite database: nothing survives the process."""

    def __init__(self) -> None:
        super().__init__(":memory:")  # never exclusive: no file to lock
