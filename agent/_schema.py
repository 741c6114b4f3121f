"""The database file's schema: its tables, the migrations between versions (``PRAGMA
user_version``) and the settings every connection to it gets (WAL, ``synchronous=FULL``, small
pages, incremental auto-vacuum)."""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path

from agent._errors import StoreError

log = logging.getLogger("edgesaga.store")

SCHEMA_VERSION = 6
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
#: A database made before incremental auto-vacuum is converted (one full ``VACUUM``, which
#: rewrites the file) only when it is at most this big; a bigger one keeps reusing its free pages
#: without giving them back to the file system (see docs/decisions.md).
CONVERT_AUTO_VACUUM_MAX_BYTES = 32 * 1024 * 1024
#: ``PRAGMA auto_vacuum`` for INCREMENTAL.
AUTO_VACUUM_INCREMENTAL = 2
#: The statuses recovery resumes, as the SQL literal the partial index ``instances_resumable`` is
#: declared with (a query uses that index only when it names the very same list).
RESUMABLE_SQL = "('ACTIVE','COMPENSATING')"

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
    # A completed attempt remembers the output values its step commanded (JSON, by device: the
    # value before and the value set), so its compensation can put them back after a restart
    # without a field in the workflow's state model.
    4: """
    ALTER TABLE journal ADD COLUMN outputs TEXT;
    """,
    # Every operator query and every hot-path statement finds its rows by an index, so its cost
    # is what it returns, not the size of the history (issue 12). Newest-first lists walk
    # created_at, alone or after status / type and status; recovery walks the resumable instances
    # in creation order (a partial index: written only when a workflow starts or stops being
    # resumable); retention walks the finished ones by finished_at (partial: a running workflow's
    # commit never touches it) and deletes a pruned workflow's events by its number (an index
    # appended at its end, as events are made) and its replies by its id.
    5: f"""
    CREATE INDEX instances_created ON instances(created_at);
    CREATE INDEX instances_status_created ON instances(status, created_at);
    CREATE INDEX instances_type_status_created ON instances(workflow_type, status, created_at);
    CREATE INDEX instances_resumable ON instances(n) WHERE status IN {RESUMABLE_SQL};
    CREATE INDEX instances_finished ON instances(finished_at) WHERE finished_at IS NOT NULL;
    CREATE INDEX instances_definition ON instances(definition_hash);
    ALTER TABLE outbox ADD COLUMN n INTEGER;
    UPDATE outbox SET n = (SELECT i.n FROM instances i WHERE i.id = outbox.workflow_id)
        WHERE workflow_id IS NOT NULL;
    CREATE INDEX outbox_instance ON outbox(n) WHERE n IS NOT NULL;
    ALTER TABLE requests ADD COLUMN workflow_id TEXT;
    UPDATE requests SET workflow_id = json_extract(reply, '$.workflow_id');
    CREATE INDEX requests_workflow ON requests(workflow_id) WHERE workflow_id IS NOT NULL;
    CREATE INDEX requests_created ON requests(created_at);
    """,
    # A schedule's fire (DESIGN §11) is recorded in the transaction that creates its workflow, so
    # no slot fires twice, across restarts and clock jumps back. The primary key is the index of
    # both questions asked of it: the latest fire of a schedule, and whether a slot fired.
    6: """
    CREATE TABLE schedule_fires (
        schedule TEXT NOT NULL,
        slot TEXT NOT NULL,
        workflow_id TEXT NOT NULL,
        PRIMARY KEY (schedule, slot)
    ) WITHOUT ROWID;
    """,
}


def connect(path: str, *, readonly: bool, busy_timeout_ms: int) -> sqlite3.Connection:
    """A connection to the database at ``path`` with the store's settings, its schema migrated to
    the current version (a read-only one only checked)."""
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    if readonly:
        if not os.path.exists(path):
            raise StoreError(f"No database at {path}. Start a workflow first, or pass --db PATH.")
        conn = _connect_readonly(path)
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=True)
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    if not readonly and path != ":memory:":
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:  # both only take effect before the first table is made
            conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
            conn.execute(f"PRAGMA auto_vacuum = {AUTO_VACUUM_INCREMENTAL}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise StoreError(f"Could not switch {path} to WAL mode (got {mode}).")
    conn.execute("PRAGMA synchronous = FULL")
    if not readonly:
        conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT}")
    conn.execute("PRAGMA foreign_keys = ON")
    migrate(conn, path, readonly=readonly)
    if not readonly and path != ":memory:":
        _ensure_incremental_vacuum(conn, path)
    return conn


def _ensure_incremental_vacuum(conn: sqlite3.Connection, path: str) -> None:
    """Give a database made before incremental auto-vacuum that mode: at once (one ``VACUUM``)
    when the file is small, else never (logged): a ``VACUUM`` rewrites the whole file."""
    if conn.execute("PRAGMA auto_vacuum").fetchone()[0] == AUTO_VACUUM_INCREMENTAL:
        return
    size = os.path.getsize(path)
    if size > CONVERT_AUTO_VACUUM_MAX_BYTES:
        log.warning(
            "%s was made without incremental auto-vacuum and is %d MiB: pruned space is reused "
            "but the file does not shrink. To shrink it, stop the agent and run "
            "`sqlite3 %s 'PRAGMA auto_vacuum=INCREMENTAL; VACUUM'` once.",
            path,
            size // (1024 * 1024),
            path,
        )
        return
    conn.execute(f"PRAGMA auto_vacuum = {AUTO_VACUUM_INCREMENTAL}")
    try:
        conn.execute("VACUUM")
    except sqlite3.OperationalError as exc:  # no room for the copy, say: it stays as it was
        log.warning("%s: could not switch to incremental auto-vacuum (%s)", path, exc)


def migrate(conn: sqlite3.Connection, path: str, *, readonly: bool) -> None:
    """Bring the schema to ``SCHEMA_VERSION``, one transaction per migration; a read-only
    connection is only checked to be readable."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path} has schema version {version}, newer than this edgesaga understands "
            f"({SCHEMA_VERSION}). Upgrade edgesaga."
        )
    if readonly:
        if version < READABLE_FROM:
            raise StoreError(f"{path} is not an edgesaga database (or an old one).")
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
