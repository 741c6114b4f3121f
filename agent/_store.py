"""The durable store: the workflow journal's domain SQL on one SQLite file.

What a transition commits (the instance row, its journal rows, its outbox events), the reads the
engine, control and recovery make, request-id replies, the outbox and retention. The writer
thread and its group commit are ``agent._writer``'s; the schema and its migrations
``agent._schema``'s; the record shapes ``agent._records``'. The names other modules have always
imported from here still are.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Sequence
from typing import Any

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
from agent._schema import _MIGRATIONS, JOURNAL_SPAN, SCHEMA_VERSION
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

_UPDATE_INSTANCE = (
    "UPDATE instances SET status=?, current_step=?, error=?, state=?, progress=?, updated_at=?, "
    "finished_at=? WHERE n=?"
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
_INSERT_EVENT = "INSERT INTO outbox(seq, kind, workflow_id, payload) VALUES (?,?,?,?)"


def _instance_columns(tr: Transition) -> tuple[Any, ...]:
    """What a transition sets on its instance row: status, current_step, error, state, progress
    and updated_at, in that order (both the INSERT and the UPDATE list them so)."""
    return (tr.status.value, tr.current_step, tr.error, tr.state_json, tr.progress_json, tr.at)


class SQLiteStore(GroupWriter):
    """The durable store on one SQLite file (async context manager).

    WAL mode, ``synchronous=FULL``, one writer connection on one thread, ``BEGIN IMMEDIATE``,
    ``PRAGMA user_version`` migrations. By default it takes an exclusive lock on the database file
    so only one process drives it; ``readonly=True`` opens it for reading only.
    """

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
        """journal_mode, synchronous (2 = FULL), foreign_keys, user_version, page_size and
        wal_autocheckpoint."""

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
                )
            }

        return await self.read(q)

    # -- writes ------------------------------------------------------------------------------------
    def _key(self, conn: sqlite3.Connection, workflow_id: str) -> int:
        n = self._keys.get(workflow_id)
        if n is None:
            row = conn.execute("SELECT n FROM instances WHERE id=?", (workflow_id,)).fetchone()
            if row is None:
                raise StoreError(f"Workflow {workflow_id} is not in the database (pruned?).")
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
        starts: list[tuple[Any, ...]] = []
        ends: list[tuple[Any, ...]] = []
        events: list[tuple[Any, ...]] = []
        for tr in transitions:
            n = self._key(conn, tr.workflow_id)
            updates.append(
                (*_instance_columns(tr), tr.at if tr.status.value in FINISHED else None, n)
            )
            self._journal_rows(n, tr, starts, ends)
            self._event_rows(tr.workflow_id, tr.events, events)
        cur = conn.executemany(_UPDATE_INSTANCE, updates)
        if cur.rowcount != len(updates):
            ids = ", ".join(tr.workflow_id for tr in transitions)
            raise StoreError(f"Workflow {ids} is not in the database (pruned?).")
        self._write_rows(conn, starts, ends, events)

    def _append(self, conn: sqlite3.Connection, n: int, tr: Transition) -> None:
        """The journal rows and outbox events of a transition."""
        starts: list[tuple[Any, ...]] = []
        ends: list[tuple[Any, ...]] = []
        events: list[tuple[Any, ...]] = []
        self._journal_rows(n, tr, starts, ends)
        self._event_rows(tr.workflow_id, tr.events, events)
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
        events: Iterable[tuple[str, dict[str, Any]]],
        rows: list[tuple[Any, ...]],
    ) -> None:
        """Number the events (``payload["seq"]``) and add their outbox rows to ``rows``."""
        for kind, payload in events:
            seq = self._next_seq
            self._next_seq += 1
            payload["seq"] = seq
            rows.append((seq, kind, workflow_id, stored_event(kind, payload)))

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
        self._event_rows(workflow_id, events, rows)
        conn.executemany(_INSERT_EVENT, rows)

    def _create(self, conn: sqlite3.Connection, new: NewInstance) -> bool:
        if conn.execute("SELECT 1 FROM instances WHERE id=?", (new.id,)).fetchone():
            return False
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
        if new.request is not None:
            self._put_request(conn, *new.request)
        return True

    async def create_instance(self, new: NewInstance) -> bool:
        """Insert a new instance (and its definition snapshot, first transition, events and
        request-id reply) in one transaction. Returns False, writing nothing, when an instance with
        that id already exists."""

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
        conn.execute(
            "INSERT OR IGNORE INTO requests(request_id, reply, created_at, command_hash) "
            "VALUES (?,?,?,?)",
            (request_id, dumps(reply), time.time(), command_hash),
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

        return await self.read(fn)

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

    _COLUMNS = (
        "i.id, i.workflow_type, i.definition_hash, i.status, i.current_step, i.error, i.state, "
        "i.progress, i.created_at, i.updated_at"
    )

    async def load_instance(self, workflow_id: str) -> InstanceRecord | None:
        """One instance with its definition snapshot, or None."""

        def fn(conn: sqlite3.Connection) -> InstanceRecord | None:
            row = conn.execute(
                f"SELECT {self._COLUMNS}, d.body FROM instances i "
                "JOIN definitions d ON d.hash = i.definition_hash WHERE i.id = ?",
                (workflow_id,),
            ).fetchone()
            return self._record(row, row[10]) if row else None

        return await self.read(fn)

    async def list_instances(
        self,
        *,
        status: Iterable[str] | str | None = None,
        workflow_type: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[InstanceRecord]:
        """Instances, newest first, optionally filtered by status and type."""
        statuses = [status] if isinstance(status, str) else list(status or [])

        def fn(conn: sqlite3.Connection) -> list[InstanceRecord]:
            where: list[str] = []
            args: list[Any] = []
            if statuses:
                where.append(f"i.status IN ({','.join('?' * len(statuses))})")
                args.extend(WorkflowStatus(s).value for s in statuses)
            if workflow_type:
                where.append("i.workflow_type = ?")
                args.append(workflow_type)
            sql = f"SELECT {self._COLUMNS} FROM instances i"
            if where:
                sql += " WHERE " + " AND ".join(where)
            sql += " ORDER BY i.created_at DESC, i.id LIMIT ? OFFSET ?"
            return [self._record(r) for r in conn.execute(sql, (*args, limit, offset))]

        return await self.read(fn)

    async def count_by_status(self) -> dict[str, int]:
        def fn(conn: sqlite3.Connection) -> dict[str, int]:
            return dict(
                conn.execute("SELECT status, count(*) FROM instances GROUP BY status").fetchall()
            )

        return await self.read(fn)

    async def journal(self, workflow_id: str) -> list[JournalEntry]:
        """Every step and compensation attempt of one instance, in order."""

        def fn(conn: sqlite3.Connection) -> list[JournalEntry]:
            rows = conn.execute(
                "SELECT i.id, j.seq, j.step, j.phase, j.attempt, j.outcome, j.started_at, "
                f"j.ended_at, j.error FROM {_JOURNAL_OF} WHERE i.id = ? ORDER BY j.k",
                (workflow_id,),
            )
            return [JournalEntry(*r) for r in rows]

        return await self.read(fn)

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

        return await self.read(fn)

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

        return await self.read(fn)

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
        return await self.read(
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
    ) -> list[str]:
        """Delete finished instances older than ``max_age`` seconds or beyond the newest
        ``max_finished``, with their journal and published events. Returns their ids."""
        now = time.time() if now is None else now

        def fn(conn: sqlite3.Connection) -> list[str]:
            marks = ",".join("?" * len(FINISHED))
            doomed: set[str] = set()
            if max_age is not None:
                doomed.update(
                    r[0]
                    for r in conn.execute(
                        f"SELECT id FROM instances WHERE status IN ({marks}) AND finished_at < ?",
                        (*FINISHED, now - max_age),
                    )
                )
            if max_finished is not None:
                doomed.update(
                    r[0]
                    for r in conn.execute(
                        f"SELECT id FROM instances WHERE status IN ({marks}) "
                        "ORDER BY finished_at DESC, id LIMIT -1 OFFSET ?",
                        (*FINISHED, max_finished),
                    )
                )
            ids = sorted(doomed)
            if ids:
                top = conn.execute("SELECT max(seq) FROM outbox").fetchone()[0]
                if top is not None:
                    self._raise_last_seq(conn, top)
            for chunk in range(0, len(ids), 500):
                part = ids[chunk : chunk + 500]
                m = ",".join("?" * len(part))
                conn.executemany(
                    f"DELETE FROM journal WHERE k BETWEEN ?1 * {JOURNAL_SPAN} "
                    f"AND ?1 * {JOURNAL_SPAN} + {JOURNAL_SPAN - 1}",
                    conn.execute(f"SELECT n FROM instances WHERE id IN ({m})", part).fetchall(),
                )
                conn.execute(f"DELETE FROM instances WHERE id IN ({m})", part)
                # their events (published or, with no broker, never to be) and request-id replies
                conn.execute(f"DELETE FROM outbox WHERE workflow_id IN ({m})", part)
                conn.execute(
                    f"DELETE FROM requests WHERE json_extract(reply, '$.workflow_id') IN ({m})",
                    part,
                )
                for wid in part:
                    self._keys.pop(wid, None)
            conn.execute(
                "DELETE FROM definitions WHERE hash NOT IN (SELECT DISTINCT definition_hash FROM instances)"
            )
            conn.execute(
                "DELETE FROM requests WHERE created_at < ?", (now - (max_age or 30 * 86400),)
            )
            return ids

        return await self.write(fn)

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
