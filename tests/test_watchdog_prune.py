"""A large retention prune under a short systemd watchdog: the agent keeps pinging through it.

systemd kills a service that lets ``WatchdogSec`` pass without ``WATCHDOG=1``; a prune that held
the store's writer thread longer than that got the agent killed mid-prune, its transaction rolled
back, and the next start pruned again from scratch. The agent here is a real ``edgesaga run``
subprocess with ``WATCHDOG_USEC`` of 2 s and a database of tens of thousands of finished
workflows to prune down to 100; the test listens on its ``NOTIFY_SOCKET`` as systemd would. With
the former prune (one transaction on the writer thread) either READY waited for the whole prune
or, when READY came first, 5.8 s went by without a ping: both fail here.

The database is filled fast: one real workflow (started with a request id, so it has its
stored reply, and run to its end) is copied with ``INSERT ... SELECT`` under new ids, with its
journal, its outbox events (never published: MQTT is off) and its request reply.
"""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
from pathlib import Path

from agent import SQLiteStore, WorkflowBuilder
from agent._schema import JOURNAL_SPAN
from tests.flows.service.harness import SERVICE_DEFS, agent_process, poll, write_config

WATCHDOG_USEC = 2_000_000


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]


def _copy(conn: sqlite3.Connection, table: str, values: dict[str, str], source: str) -> None:
    """``INSERT INTO table SELECT`` with ``values`` (SQL over ``x.i``, the template row ``t`` and
    the copy's instance ``i``) for the columns they name (those the table has; "" leaves one to
    its default), the template's value for the others."""
    cols = [c for c in _columns(conn, table) if c not in values or values[c]]
    exprs = [values.get(c) or f"t.{c}" for c in cols]
    conn.execute(f"INSERT INTO {table} ({', '.join(cols)}) SELECT {', '.join(exprs)} {source}")


async def _fill(database: Path, count: int) -> None:
    """``count`` COMPLETED ServiceQuick workflows, finished in the order they were made."""
    async with SQLiteStore(database) as store:
        builder = WorkflowBuilder(definitions=[SERVICE_DEFS])
        wf = await builder.create_workflow(
            "ServiceQuick", {}, store=store, request=("template-request", {"ok": True})
        )
        await wf.run()
        template = wf.id
    conn = sqlite3.connect(database)
    seq = f"WITH RECURSIVE x(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM x WHERE i < {count})"
    new_id = "printf('00000000-0000-4000-8000-%012d', x.i)"
    try:
        with conn:
            conn.execute("CREATE TEMP TABLE x AS " + seq + " SELECT i FROM x")
            _copy(
                conn,
                "instances",
                {
                    "n": "",
                    "id": new_id,
                    "created_at": "t.created_at + x.i * 1e-3",
                    "updated_at": "t.updated_at + x.i * 1e-3",
                    "finished_at": "t.finished_at + x.i * 1e-3",
                },
                f"FROM temp.x x JOIN instances t ON t.id = '{template}' ORDER BY x.i",
            )
            _copy(
                conn,
                "journal",
                {"k": f"i.n * {JOURNAL_SPAN} + t.seq", "n": "i.n"},
                f"FROM instances o JOIN journal t ON t.n = o.n JOIN instances i "
                f"ON i.id LIKE '00000000-0000-4000-8000-%' WHERE o.id = '{template}'",
            )
            _copy(
                conn,
                "outbox",
                {"seq": "", "workflow_id": new_id, "n": "i.n"},
                f"FROM temp.x x JOIN outbox t ON t.workflow_id = '{template}' "
                f"JOIN instances i ON i.id = {new_id} ORDER BY x.i, t.seq",
            )
            _copy(
                conn,
                "requests",
                {
                    "request_id": "'r-' || x.i",
                    "reply": f"json_set(t.reply, '$.workflow_id', {new_id})",
                    "workflow_id": new_id,
                },
                "FROM temp.x x JOIN requests t ON t.request_id = 'template-request'",
            )
    finally:
        conn.close()


def _completed(database: Path) -> int:
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        query = "SELECT count(*) FROM instances WHERE status = 'COMPLETED'"
        return int(conn.execute(query).fetchone()[0])
    finally:
        conn.close()


def test_a_large_prune_never_lets_the_watchdog_expire(tmp_path: Path) -> None:
    count = 30_000
    config = write_config(
        tmp_path,
        hardware=None,
        retention={"max_finished": 100, "max_age_days": None, "interval": 1},
    )
    db = tmp_path / "state" / "edgesaga.db"
    db.parent.mkdir()
    asyncio.run(_fill(db, count))
    assert _completed(db) == count + 1

    with agent_process(config, watchdog_usec=WATCHDOG_USEC) as agent:
        t_ready, _ = agent.notify.wait_for("READY", within=30)
        at_ready = _completed(db)
        poll(lambda: _completed(db), lambda n: n == 100, within=120, what="the prune to 100")
        t_pruned = agent.notify.snapshot()[-1][0]
        # A few more pings after it, then the stop.
        poll(
            lambda: agent.notify.times("WATCHDOG"),
            lambda pings: sum(t > t_pruned for t in pings) >= 2,
            within=10,
            what="pings after the prune",
        )
        assert agent.proc.poll() is None, agent.log_text()
        agent.terminate()
        assert agent.wait_exit(10) == 0
        pings = agent.notify.times("WATCHDOG")
        log = agent.log_text()

    assert "retention: pruned" in log, log
    # The prune did not hold READY back: it had not got far when READY came (it takes seconds).
    assert at_ready > 100
    # The contract systemd enforces: from READY on, never WatchdogSec without a ping.
    gaps = [b - a for a, b in itertools.pairwise([t_ready, *pings])]
    assert max(gaps) < WATCHDOG_USEC / 1e6, [round(g, 2) for g in gaps]
    assert _completed(db) == 100
