"""The durable store: one SQLite file, one writer thread, group commit.

Every write is a function run on the writer thread. The thread takes everything queued, wraps it in
one ``BEGIN IMMEDIATE`` ... ``COMMIT`` (each request in its own savepoint, so one bad request does
not sink the others) and hands the results back to the event loop with one
``call_soon_threadsafe``. Concurrent workflows therefore share fsyncs instead of queuing on them.
Reads run on the same thread between batches (WAL: they never block the writer).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import math
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, Self, TypeVar

from agent._errors import DatabaseLocked, DiskFull, StoreError
from agent._status import WorkflowStatus

log = logging.getLogger("edgesaga.store")
T = TypeVar("T")

SCHEMA_VERSION = 3
#: The oldest schema a read-only store can read (the tables it reads have not changed since).
READABLE_FROM = 2
#: A journal row's key: instance number * JOURNAL_SPAN + attempt seq (see migration 2).
JOURNAL_SPAN = 1 << 32
#: Smaller pages mean fewer bytes per commit on an SD card (see docs/decisions.md).
PAGE_SIZE = 1024
#: Checkpoint the WAL into the database every this many pages (4 MiB at 1 KiB pages): a page that
#: many commits rewrite is copied into the database once per checkpoint, so rarer checkpoints write
#: fewer bytes per step (see docs/decisions.md).
WAL_AUTOCHECKPOINT = 4096

_MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE definitions (
        hash TEXT PRIMARY KEY,
        workflow_type TEXT NOT NULL,
        workflow_version TEXT NOT NULL,
        body TEXT NOT NULL
    );
    CREATE TABLE instances (
        n INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        workflow_type TEXT NOT NULL,
        definition_hash TEXT NOT NULL REFERENCES definitions(hash),
        status TEXT NOT NULL,
        current_step TEXT,
        error TEXT,
        state TEXT NOT NULL,
        progress TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        finished_at REAL
    );
    CREATE TABLE journal (
        n INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        step TEXT NOT NULL,
        phase TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        outcome TEXT NOT NULL,
        started_at REAL NOT NULL,
        ended_at REAL,
        error TEXT,
        PRIMARY KEY (n, seq)
    ) WITHOUT ROWID;
    CREATE TABLE outbox (
        seq INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        workflow_id TEXT,
        payload TEXT NOT NULL
    );
    CREATE TABLE requests (
        request_id TEXT PRIMARY KEY,
        reply TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value TEXT
    );
    """,
    # The journal becomes a rowid table keyed n * 2^32 + seq: a workflow's attempts are appended
    # at the right edge of a rowid B-tree, which fills its pages (the (n, seq) index B-tree split
    # them in half), so a step commit writes fewer pages.
    2: """
    CREATE TABLE journal_v2 (
        k INTEGER PRIMARY KEY,
        n INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        step TEXT NOT NULL,
        phase TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        outcome TEXT NOT NULL,
        started_at REAL NOT NULL,
        ended_at REAL,
        error TEXT
    );
    INSERT INTO journal_v2
        SELECT n * 4294967296 + seq, n, seq, step, phase, attempt, outcome, started_at, ended_at,
               error
        FROM journal ORDER BY n, seq;
    DROP TABLE journal;
    ALTER TABLE journal_v2 RENAME TO journal;
    """,
    # A stored reply remembers the command it answered (a hash of its name and body), so a
    # request id reused for another command is refused, not answered with the first reply. Only
    # accepted commands are remembered now: the refusals stored before are forgotten.
    3: """
    ALTER TABLE requests ADD COLUMN command_hash TEXT;
    DELETE FROM requests WHERE json_extract(reply, '$.ok') IS NOT 1;
    """,
}

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


#: Compact JSON for what the store writes (one encoder: ``json.dumps`` with arguments builds a new
#: one on every call).
dumps = json.JSONEncoder(separators=(",", ":")).encode

_iso_second: tuple[int, str] = (-1, "")
_iso_last: tuple[float, str] = (-1.0, "")  # the events of one transition share their time


def iso(ts: float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC with milliseconds (``2026-11-26T22:55:10.382Z``), as
    ``datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")`` gives them; the date
    and time of the current second are formatted once (this runs for every event)."""
    global _iso_second, _iso_last
    if ts is None:
        return None
    if ts == _iso_last[0]:
        return _iso_last[1]
    frac, whole = math.modf(ts)  # the rounding datetime.fromtimestamp does
    second, micros = int(whole), round(frac * 1_000_000)
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    elif micros < 0:
        second, micros = second - 1, micros + 1_000_000
    if _iso_second[0] != second:
        _iso_second = (second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    text = f"{_iso_second[1]}.{micros // 1000:03d}Z"
    _iso_last = (ts, text)
    return text


# ------------------------------------------------------------------------------------------------
# Records


class InstanceRecord(NamedTuple):
    """One workflow instance as stored."""

    id: str
    workflow_type: str
    definition_hash: str
    status: WorkflowStatus
    current_step: str | None
    error: str | None
    state: dict[str, Any]
    progress: dict[str, Any]
    created_at: float
    updated_at: float
    definition: str | None = None  # the snapshot JSON, when asked for

    def summary(self) -> dict[str, Any]:
        return {
            "workflow_id": self.id,
            "workflow_type": self.workflow_type,
            "status": self.status.value,
            "current_step": self.current_step,
            "error": self.error,
            "created_at": iso(self.created_at),
            "updated_at": iso(self.updated_at),
        }


class JournalEntry(NamedTuple):
    """One attempt of a step or a compensation."""

    workflow_id: str
    seq: int
    step: str
    phase: str
    attempt: int
    outcome: str  # started | completed | failed | interrupted | cancelled
    started_at: float
    ended_at: float | None
    error: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "step": self.step,
            "phase": self.phase,
            "attempt": self.attempt,
            "outcome": self.outcome,
            "started_at": iso(self.started_at),
            "ended_at": iso(self.ended_at),
            "error": self.error,
        }


class OutboxItem(NamedTuple):
    """An event or alert waiting to be published; ``payload["seq"] == seq``."""

    seq: int
    kind: str  # "event" | "alert"
    workflow_id: str | None
    payload: dict[str, Any]


class JournalStart(NamedTuple):
    seq: int
    step: str
    phase: str
    attempt: int
    at: float


class JournalEnd(NamedTuple):
    seq: int
    outcome: str
    at: float
    error: str | None = None


class Transition(NamedTuple):
    """Everything one state transition writes, committed atomically."""

    workflow_id: str
    status: WorkflowStatus
    current_step: str | None
    error: str | None
    state_json: str
    progress_json: str
    at: float
    journal: Sequence[JournalStart | JournalEnd] = ()
    events: Sequence[tuple[str, dict[str, Any]]] = ()  # (kind, payload)


class NewInstance(NamedTuple):
    id: str
    workflow_type: str
    workflow_version: str
    definition_hash: str
    definition: str
    first: Transition
    request: tuple[str, dict[str, Any]] | None = None


# ------------------------------------------------------------------------------------------------


class _Request:
    __slots__ = ("fn", "future", "transition", "write")

    def __init__(
        self,
        fn: Callable[[sqlite3.Connection], Any],
        future: asyncio.Future[Any],
        write: bool,
        transition: Transition | None = None,
    ):
        self.fn = fn
        self.future = future
        self.write = write
        self.transition = transition  # a plain transition commit, which can join a bulk write


_STOP = object()

_UPDATE_INSTANCE = (
    "UPDATE instances SET status=?, current_step=?, error=?, state=?, progress=?, updated_at=?, "
    "finished_at=? WHERE n=?"
)
_INSERT_JOURNAL = (
    "INSERT INTO journal(k, n, seq, step, phase, attempt, outcome, started_at)"
    f" VALUES (?1 * {JOURNAL_SPAN} + ?2, ?1, ?2, ?3, ?4, ?5, 'started', ?6)"
)
_END_JOURNAL = (
    f"UPDATE journal SET outcome=?1, ended_at=?2, error=?3 WHERE k = ?4 * {JOURNAL_SPAN} + ?5"
)
_INSERT_EVENT = "INSERT INTO outbox(seq, kind, workflow_id, payload) VALUES (?,?,?,?)"


class SQLiteStore:
    """The durable store on one SQLite file (async context manager).

    WAL mode, ``synchronous=FULL``, one writer connection on one thread, ``BEGIN IMMEDIATE``,
    ``PRAGMA user_version`` migrations. By default it takes an exclusive lock file beside the
    database so only one process drives it; ``readonly=True`` opens it for reading only.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        readonly: bool = False,
        exclusive: bool = True,
        busy_timeout_ms: int = 5000,
        disk_full_grace: float = 60.0,
    ) -> None:
        self.path = str(path)
        #: Seconds a workflow whose commit finds the disk full keeps its outputs as they are; then
        #: the engine drives them to their safe values (the commit still waits for space).
        self.disk_full_grace = disk_full_grace
        #: True from a write that found the disk full until a write commits again.
        self.disk_full = False
        self._disk_full_listeners: list[Callable[[DiskFull], None]] = []
        self.readonly = readonly
        self.exclusive = exclusive and not readonly and self.path != ":memory:"
        self.busy_timeout_ms = busy_timeout_ms
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock_fd: int | None = None
        self._next_seq = 1
        self._keys: dict[str, int] = {}  # workflow id -> instances.n (store thread only)
        self._outbox_event: asyncio.Event | None = None
        self._outbox_listeners: list[Callable[[], None]] = []
        self.commits = 0  # transactions committed (for benchmarks and tests)
        self.batched = 0  # write requests committed

    # -- lifecycle -------------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def is_open(self) -> bool:
        return self._thread is not None

    async def open(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._outbox_event = asyncio.Event()
        if self.exclusive:
            self._take_lock()
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._run,
            args=(ready,),
            name=f"edgesaga-store:{Path(self.path).name}",
            daemon=True,
        )
        self._thread.start()
        try:
            await ready
        except BaseException:
            self._thread.join()
            self._thread = None
            self._release_lock()
            raise

    async def close(self) -> None:
        if self._thread is None:
            return
        self._queue.put(_STOP)
        await asyncio.to_thread(self._thread.join)
        self._thread = None
        self._release_lock()

    def _take_lock(self) -> None:
        """Lock the database file itself (``flock``), so every name of it — a symbolic link, a
        hard link, a linked directory — reaches the same lock. The file is created (empty, which
        SQLite takes for a new database) when it does not exist yet.

        The descriptor stays open while the store is: closing a descriptor of the database file
        would drop SQLite's own (POSIX) locks on it, so it is closed only after the connection."""
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise StoreError(
                f"Cannot open the database {self.path}: {exc.strerror or exc}. Give a path to a "
                "file in a directory this user may write."
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DatabaseLocked(self.path) from None
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @staticmethod
    def is_locked(path: str | os.PathLike[str]) -> bool:
        """True when another process drives the database at ``path`` (by any name of the file).

        Call it before this process opens the file with SQLite: it opens and closes a descriptor
        of the file, and a close drops the process's SQLite locks on it."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False  # no such file (or not readable): nothing drives it that we could see
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    # -- the writer thread -------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        if self.readonly:
            if not os.path.exists(self.path):
                raise StoreError(
                    f"No database at {self.path}. Start a workflow first, or pass --db PATH."
                )
            conn = _connect_readonly(self.path)
        else:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
        if not self.readonly and self.path != ":memory:":
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StoreError(f"Could not switch {self.path} to WAL mode (got {mode}).")
        conn.execute("PRAGMA synchronous = FULL")
        if not self.readonly:
            conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT}")
        conn.execute("PRAGMA foreign_keys = ON")
        self._migrate(conn)
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {version}, newer than this edgesaga understands "
                f"({SCHEMA_VERSION}). Upgrade edgesaga."
            )
        if self.readonly:
            if version < READABLE_FROM:
                raise StoreError(f"{self.path} is not an edgesaga database (or an old one).")
            return
        for target in range(version + 1, SCHEMA_VERSION + 1):
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _MIGRATIONS[target].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {target}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def _run(self, ready: asyncio.Future[None]) -> None:
        loop = self._loop
        assert loop is not None
        try:
            conn = self._connect()
            self._next_seq = self._load_next_seq(conn)
        except BaseException as exc:
            err: BaseException
            if isinstance(exc, StoreError):
                err = exc
            elif self.path != ":memory:" and _no_space(self.path):
                # SQLite says "disk I/O error" when it cannot even create the -shm file (which
                # reading needs too).
                err = DiskFull(f"The disk holding {self.path} is full; free space on it first.")
            else:
                err = StoreError(f"Cannot open the database {self.path}: {exc}")
            loop.call_soon_threadsafe(_set_exception, ready, err)
            return
        self._conn = conn
        loop.call_soon_threadsafe(_set_result, ready, None)
        stop = False
        while not stop:
            item = self._queue.get()
            batch: list[_Request] = []
            while True:
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
                if len(batch) >= 512:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._execute_batch(conn, batch)
        conn.close()
        self._conn = None

    def _load_next_seq(self, conn: sqlite3.Connection) -> int:
        if self.readonly:
            return 0
        top = conn.execute("SELECT max(seq) FROM outbox").fetchone()[0] or 0
        row = conn.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone()
        acked = int(row[0]) if row else 0
        return max(top, acked) + 1

    def _execute_batch(self, conn: sqlite3.Connection, batch: list[_Request]) -> None:
        results: list[tuple[asyncio.Future[Any], bool, Any]] = []
        writes = []
        for req in batch:
            if req.write:
                writes.append(req)
                continue
            try:
                results.append((req.future, True, req.fn(conn)))
            except Exception as exc:
                results.append((req.future, False, _wrap(exc, self.path)))
        if writes:
            seq_before = self._next_seq
            try:
                conn.execute("BEGIN IMMEDIATE")
                if len(writes) == 1:
                    # Alone in the transaction: its failure rolls back the whole (same) thing.
                    outcomes = [(writes[0].future, True, writes[0].fn(conn))]
                else:
                    outcomes = self._write_group(conn, writes)
                conn.execute("COMMIT")
            except Exception as exc:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                self._next_seq = seq_before
                self._keys.clear()  # a rolled-back insert may have cached a key
                err = _wrap(exc, self.path)
                outcomes = [(r.future, False, err) for r in writes]
            else:
                self.commits += 1
                self.batched += len(writes)
            results.extend(outcomes)
            outbox_grew = self._next_seq != seq_before
        else:
            outbox_grew = False
        full = next((v for _, ok, v in results if not ok and isinstance(v, DiskFull)), None)
        committed = bool(writes) and full is None
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._deliver, results, outbox_grew, full, committed)

    def _write_group(
        self, conn: sqlite3.Connection, writes: list[_Request]
    ) -> list[tuple[asyncio.Future[Any], bool, Any]]:
        """Several write requests in one transaction, one failing request not sinking the others.

        Plain transition commits (the bulk of the traffic) are written together with one
        ``executemany`` per table inside one savepoint; if anything in that goes wrong they are
        redone one by one. Every other request gets a savepoint of its own.
        """
        outcomes: list[tuple[asyncio.Future[Any], bool, Any]] = []
        bulk = [r for r in writes if r.transition is not None]
        if len(bulk) > 1 and len({r.transition.workflow_id for r in bulk if r.transition}) == len(
            bulk
        ):
            conn.execute("SAVEPOINT bulk")
            seq_mark = self._next_seq
            try:
                self._apply_many(conn, [r.transition for r in bulk if r.transition is not None])
            except Exception:
                if not conn.in_transaction:
                    raise  # SQLite rolled the whole transaction back itself (full disk, I/O)
                self._next_seq = seq_mark
                self._keys.clear()
                conn.execute("ROLLBACK TO bulk")
                conn.execute("RELEASE bulk")
            else:
                conn.execute("RELEASE bulk")
                outcomes.extend((r.future, True, None) for r in bulk)
                writes = [r for r in writes if r.transition is None]
        for req in writes:
            conn.execute("SAVEPOINT req")
            seq_mark = self._next_seq
            try:
                value = req.fn(conn)
            except Exception as exc:
                if not conn.in_transaction:
                    # SQLite rolled the whole transaction back itself (a full disk, an I/O
                    # error): every request of the batch fails with this error.
                    raise
                self._next_seq = seq_mark  # keep event numbers gap-free
                self._keys.clear()  # a rolled-back insert may have cached a key
                conn.execute("ROLLBACK TO req")
                conn.execute("RELEASE req")
                outcomes.append((req.future, False, _wrap(exc, self.path)))
            else:
                conn.execute("RELEASE req")
                outcomes.append((req.future, True, value))
        return outcomes

    def _deliver(
        self,
        results: list[tuple[asyncio.Future[Any], bool, Any]],
        outbox_grew: bool,
        full: DiskFull | None = None,
        committed: bool = False,
    ) -> None:
        if full is not None:
            self.disk_full = True
            for callback in list(self._disk_full_listeners):
                try:
                    callback(full)
                except Exception:
                    log.exception("a disk-full listener failed")
        elif committed and self.disk_full:
            self.disk_full = False
            log.warning("%s: writes commit again (the disk has space)", self.path)
        for fut, ok, value in results:
            if ok:
                _set_result(fut, value)
            else:
                _set_exception(fut, value)
        if outbox_grew and self._outbox_event is not None:
            self._outbox_event.set()
            for listener in list(self._outbox_listeners):
                listener()

    async def _call(self, fn: Callable[[sqlite3.Connection], T], *, write: bool) -> T:
        if self._thread is None or self._loop is None:
            raise StoreError("The store is not open; use `async with SQLiteStore(path) as store:`.")
        if write and self.readonly:
            raise StoreError(f"{self.path} is open read-only.")
        fut: asyncio.Future[T] = self._loop.create_future()
        self._queue.put(_Request(fn, fut, write))
        return await fut

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` inside the next group transaction."""
        return await self._call(fn, write=True)

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` on the store thread outside a write transaction."""
        return await self._call(fn, write=False)

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
                (
                    tr.status.value,
                    tr.current_step,
                    tr.error,
                    tr.state_json,
                    tr.progress_json,
                    tr.at,
                    tr.at if tr.status.value in FINISHED else None,
                    n,
                )
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
                ends.append((op.outcome, op.at, op.error, n, op.seq))

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
            rows.append((seq, kind, workflow_id, _stored(kind, payload)))

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
        self._write_rows(conn, [], [], rows)

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
            (
                new.id,
                new.workflow_type,
                new.definition_hash,
                tr.status.value,
                tr.current_step,
                tr.error,
                tr.state_json,
                tr.progress_json,
                tr.at,
                tr.at,
            ),
        )
        n = self._keys[new.id] = int(cur.lastrowid or 0)
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
        if self._thread is None or self._loop is None:
            raise StoreError("The store is not open; use `async with SQLiteStore(path) as store:`.")
        if self.readonly:
            raise StoreError(f"{self.path} is open read-only.")
        fut: asyncio.Future[None] = self._loop.create_future()
        self._queue.put(_Request(lambda conn: self._apply(conn, transition), fut, True, transition))
        await fut

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
            (request_id, json.dumps(reply, separators=(",", ":")), time.time(), command_hash),
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
            return self._record(row[:10], row[10]) if row else None

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
                "j.ended_at, j.error FROM instances i JOIN journal j "
                f"ON j.k BETWEEN i.n * {JOURNAL_SPAN} AND i.n * {JOURNAL_SPAN} + {JOURNAL_SPAN - 1} "
                "WHERE i.id = ? ORDER BY j.k",
                (workflow_id,),
            )
            return [JournalEntry(*r) for r in rows]

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
            return [OutboxItem(r[0], r[1], r[2], _expanded(*r)) for r in rows]

        return await self.read(fn)

    @staticmethod
    def _raise_last_seq(conn: sqlite3.Connection, seq: int) -> None:
        """Record the highest seq ever deleted, so numbers are never reused after a reopen."""
        conn.execute(
            "INSERT INTO meta(key, value) VALUES ('last_seq', ?) ON CONFLICT(key) DO UPDATE "
            "SET value = max(CAST(value AS INTEGER), excluded.value)",
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
            if dropped < excess:
                dropped += conn.execute(
                    "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox ORDER BY seq LIMIT ?)",
                    (excess - dropped,),
                ).rowcount
            return dropped

        return await self.write(fn)

    async def wait_outbox(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109 - a plain wait with a bound
        """Wait until new outbox items were committed since the last call; False on timeout."""
        assert self._outbox_event is not None
        try:
            await asyncio.wait_for(self._outbox_event.wait(), timeout)
        except TimeoutError:
            return False
        self._outbox_event.clear()
        return True

    def add_outbox_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` on the event loop whenever outbox items were committed."""
        self._outbox_listeners.append(callback)

    def add_disk_full_listener(self, callback: Callable[[DiskFull], None]) -> None:
        """Call ``callback(error)`` on the event loop whenever a write finds the disk full (the
        outbox cannot carry the news: it is in the database)."""
        self._disk_full_listeners.append(callback)

    # -- retention ---------------------------------------------------------------------------------
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
        super().__init__(":memory:", exclusive=False)


#: What a stored workflow event leaves out: its columns (seq, workflow_id), its instance row
#: (workflow_type) and null fields. Every event of every step is written to an SD card, so it is
#: stored compact and made whole again when it is read for publishing.
_IMPLIED = frozenset(("seq", "workflow_id", "workflow_type"))
_EVENT_TEMPLATE: dict[str, Any] = dict.fromkeys(
    ("seq", "at", "workflow_id", "workflow_type", "event", "step", "attempt", "status", "error")
)


def _stored(kind: str, payload: dict[str, Any]) -> str:
    if kind != "event":
        return dumps(payload)
    return dumps({k: v for k, v in payload.items() if v is not None and k not in _IMPLIED})


def _expanded(
    seq: int, kind: str, workflow_id: str | None, text: str, workflow_type: str | None
) -> dict[str, Any]:
    payload: dict[str, Any] = json.loads(text)
    if kind != "event":
        return payload
    whole = dict(_EVENT_TEMPLATE)
    whole["workflow_id"] = workflow_id
    whole["workflow_type"] = workflow_type
    whole.update(payload)
    whole["seq"] = seq
    return whole


def _connect_readonly(path: str) -> sqlite3.Connection:
    """A read-only connection, also to a database in a directory this user may not write.

    There SQLite cannot create the -shm file a WAL database shares with its writers, and refuses
    even to read. Without a -shm file and without changes in a -wal file, no writer has the file
    open and the database file alone holds every commit: then it is read as immutable (a writer
    starting meanwhile could show this one read a torn page, never change the file)."""

    def connect(query: str) -> sqlite3.Connection:
        uri = f"file:{path}?{query}"
        return sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=True)

    conn = connect("mode=ro")
    try:
        conn.execute("PRAGMA user_version").fetchone()
    except sqlite3.OperationalError:
        wal = Path(path + "-wal")
        if Path(path + "-shm").exists() or (wal.exists() and wal.stat().st_size > 0):
            conn.close()
            raise
        conn.close()
        conn = connect("mode=ro&immutable=1")
    return conn


def _wrap(exc: Exception, path: str) -> Exception:
    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc)
        if "disk is full" in text or "database or disk is full" in text:
            return DiskFull(
                f"The disk holding {path} is full; work is paused until space is freed."
            )
        if "locked" in text or "busy" in text:
            return StoreError(f"The database {path} is busy or locked: {text}.")
    return exc


def _no_space(path: str) -> bool:
    """True when the file system holding ``path`` has no block left for this user."""
    try:
        return os.statvfs(os.path.dirname(os.path.abspath(path))).f_bavail == 0
    except OSError:
        return False


def _set_result(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
