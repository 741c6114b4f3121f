"""The store's writer: one SQLite connection on one thread, group commit.

Every write is a function run on the writer thread. The thread takes everything queued, wraps it in
one ``BEGIN IMMEDIATE`` ... ``COMMIT`` (each request in its own savepoint, so one bad request does
not sink the others) and hands the results back to the event loop with one
``call_soon_threadsafe``. Concurrent workflows therefore share fsyncs instead of queuing on them.
Reads that must run where the writes do (``read``) run on the same thread between batches; the
others (``query``: operator lists and shows, recovery pages) run on a second connection on a
thread of their own, each in a fresh read transaction, so they never wait behind a write batch
and a write never waits behind them (WAL).

The domain SQL (what a transition, a prune or a read writes and reads) is the store's, in
``agent._store``; the writer only knows that plain transition commits may be written together.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import queue
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self, TypeVar

from agent._errors import DatabaseLocked, DiskFull, StoreError
from agent._records import Transition
from agent._schema import connect

log = logging.getLogger("edgesaga.store")
T = TypeVar("T")


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


class GroupWriter:
    """One SQLite connection on one thread that commits queued writes in groups (an async
    context manager).

    By default it takes an exclusive lock on the database file so only one process drives it;
    ``readonly=True`` opens it for reading only. A subclass supplies the domain: what a bulk of
    transitions writes (``_apply_many``), its in-memory state (``_fresh``), what it loads at open (``_opened``), and the state a
    rolled-back write must restore (``_mark`` / ``_undo``)."""

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
        self._outbox_event: asyncio.Event | None = None
        self._outbox_listeners: list[Callable[[], None]] = []
        #: The reader thread's queue, while it runs (a file store that may write has one).
        self._reader_queue: queue.SimpleQueue[Any] | None = None
        self._reader: threading.Thread | None = None
        self.commits = 0  # transactions committed (for benchmarks and tests)
        self.batched = 0  # write requests committed
        self._fresh()

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
        if not self.readonly and self.path != ":memory:":
            self._start_reader()

    async def close(self) -> None:
        if self._thread is None:
            return
        reader, requests = self._reader, self._reader_queue
        if reader is not None and requests is not None:
            # Reads asked for from now on go to the writer thread; the reader answers those it
            # has, then stops (first: the writer's connection closes last).
            self._reader = self._reader_queue = None
            requests.put(_STOP)
            await asyncio.to_thread(reader.join)
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

    # -- the reader thread -------------------------------------------------------------------------
    def _start_reader(self) -> None:
        self._reader_queue = queue.SimpleQueue()
        self._reader = threading.Thread(
            target=self._read_loop,
            args=(self._reader_queue,),
            name=f"edgesaga-reader:{Path(self.path).name}",
            daemon=True,
        )
        self._reader.start()

    def _connect_reader(self) -> sqlite3.Connection:
        """A second connection to the (already migrated) file, for reads only."""
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
        conn.execute("PRAGMA query_only = 1")
        return conn

    def _read_loop(self, requests: queue.SimpleQueue[Any]) -> None:
        loop = self._loop
        assert loop is not None
        try:
            conn: sqlite3.Connection | None = self._connect_reader()
        except sqlite3.Error as exc:
            log.warning("%s: no reader connection (%s); reads go to the writer", self.path, exc)
            conn = None
        while (req := requests.get()) is not _STOP:
            if conn is None:
                self._queue.put(req)  # the writer thread answers it instead
                continue
            ok, value = self._query_once(conn, req.fn)
            loop.call_soon_threadsafe(_set_result if ok else _set_exception, req.future, value)
        if conn is not None:
            conn.close()

    def _query_once(
        self, conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], Any]
    ) -> tuple[bool, Any]:
        """``fn(conn)`` in a read transaction of its own: it sees every transaction committed
        before it began, and holds no snapshot once it returns."""
        try:
            conn.execute("BEGIN")
            try:
                return True, fn(conn)
            finally:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("COMMIT")
        except Exception as exc:
            return False, _wrap(exc, self.path)

    # -- what the domain supplies ------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        return connect(self.path, readonly=self.readonly, busy_timeout_ms=self.busy_timeout_ms)

    def _fresh(self) -> None:
        """Set up the domain's in-memory state (called once, by ``__init__``)."""

    def _opened(self, conn: sqlite3.Connection) -> None:
        """Called on the writer thread once the connection is ready, before any request."""

    def _mark(self) -> int:
        """A number that changes when a write adds outbox items (compared to tell listeners)."""
        return 0

    def _undo(self, mark: int) -> None:
        """Forget what a rolled-back write left in memory; ``mark`` is ``_mark()`` before it."""

    def _apply_many(self, conn: sqlite3.Connection, transitions: list[Transition]) -> None:
        raise NotImplementedError

    # -- the writer thread -------------------------------------------------------------------------
    def _run(self, ready: asyncio.Future[None]) -> None:
        loop = self._loop
        assert loop is not None
        try:
            conn = self._connect()
            self._opened(conn)
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
            mark = self._mark()
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
                self._undo(mark)
                err = _wrap(exc, self.path)
                outcomes = [(r.future, False, err) for r in writes]
            else:
                self.commits += 1
                self.batched += len(writes)
            results.extend(outcomes)
            outbox_grew = self._mark() != mark
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
            mark = self._mark()
            try:
                self._apply_many(conn, [r.transition for r in bulk if r.transition is not None])
            except Exception:
                if not conn.in_transaction:
                    raise  # SQLite rolled the whole transaction back itself (full disk, I/O)
                self._undo(mark)
                conn.execute("ROLLBACK TO bulk")
                conn.execute("RELEASE bulk")
            else:
                conn.execute("RELEASE bulk")
                outcomes.extend((r.future, True, None) for r in bulk)
                writes = [r for r in writes if r.transition is None]
        for req in writes:
            conn.execute("SAVEPOINT req")
            mark = self._mark()
            try:
                value = req.fn(conn)
            except Exception as exc:
                if not conn.in_transaction:
                    # SQLite rolled the whole transaction back itself (a full disk, an I/O
                    # error): every request of the batch fails with this error.
                    raise
                self._undo(mark)  # keep event numbers gap-free
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

    async def _call(
        self,
        fn: Callable[[sqlite3.Connection], T],
        *,
        write: bool,
        transition: Transition | None = None,
    ) -> T:
        """Queue ``fn`` for the writer thread and wait for its result; ``transition`` marks a
        plain transition commit, which may be written in bulk with others."""
        if self._thread is None or self._loop is None:
            raise StoreError("The store is not open; use `async with SQLiteStore(path) as store:`.")
        if write and self.readonly:
            raise StoreError(f"{self.path} is open read-only.")
        fut: asyncio.Future[T] = self._loop.create_future()
        self._queue.put(_Request(fn, fut, write, transition))
        return await fut

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` inside the next group transaction."""
        return await self._call(fn, write=True)

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` on the store thread outside a write transaction."""
        return await self._call(fn, write=False)

    async def query(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` on the reader connection, in a read transaction of its own: it never
        waits for a write batch, and a write never waits for it. It sees every write awaited
        before it was called. A store without a second connection (in memory, read-only) runs it
        on the store thread, as ``read`` does."""
        requests = self._reader_queue
        if requests is None:
            return await self.read(fn)
        if self._loop is None:
            raise StoreError("The store is not open; use `async with SQLiteStore(path) as store:`.")
        fut: asyncio.Future[T] = self._loop.create_future()
        requests.put(_Request(fn, fut, False))
        return await fut

    # -- outbox and disk-full news ---------------------------------------------------------------
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
