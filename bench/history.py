"""History: what a database of 1k to 1M workflows costs the agent, beside the 1k figures of the
same run.

    python bench/history.py [--sizes 1000,10000,100000,1000000] [--unfinished-sizes 1000,10000,100000]
                            [--prune-up-to N] [--quick] [--seconds S] [--dir DIR]

**How the databases are built** (fast, from real rows): one no-op payment saga
(``bench/noop_payment.yaml``) is run through the real engine on a scratch store and what it wrote
is kept (``bench/throughput.capture``). Ten templates are written through the real store, each
with the request-id reply a ``start`` command leaves: for a history of *finished* workflows every
transition (COMPLETED), for *unfinished* ones the instance and its first step commit only (ACTIVE,
step 1 completed, step 2 started: a power cut during step 2). Then, on one plain ``sqlite3``
connection with ``journal_mode=OFF`` and ``synchronous=OFF``, in one transaction, ``INSERT ...
SELECT`` over a recursive counter copies the templates' rows up to N: ``instances`` (new ``n``, a
random-looking UUID id, times shifted so creation order is time order, one second apart, ending
now), ``journal`` (key ``k = n * 2^32 + seq``), ``requests`` (request id, the reply's
``workflow_id`` and any ``workflow_id`` column) and ``outbox`` (its ``workflow_id`` and any ``n``
column; the events of the newest
workflows, up to the default outbox cap of 100,000 rows: a device whose broker has been away).
The columns are read from the schema, so the copy follows migrations. The file is switched back
to WAL at the end.

**What is measured**, for each history size N:

a) *prune* N finished -> 1,000 with ``store.prune(max_finished=1000)`` (then ``store.reclaim()``
   when the store has it, and a WAL checkpoint), while four loops run no-op sagas through the same
   store: the total time (and the reclaim's part), the time per pruned workflow (the prune alone,
   without the reclaim), and the latency of every commit of those workflows that waited during
   it (max, p99; and the max while the reclaim ran); the database file after it (and the final
   ``TRUNCATE`` checkpoint), beside a fresh database of the same rows (``VACUUM INTO``): the
   1,000 kept and the workflows the four loops ran meanwhile (about as many again at 100k), which
   a fresh database of 1,000 would leave out;
b) *READY* of a real ``edgesaga run`` (``NOTIFY_SOCKET`` owned by this script) and its ``VmRSS``
   at READY, with N unfinished workflows (``--unfinished-sizes``) and with an empty database; then
   the time until all N are COMPLETED (the database polled read-only), and checks that none is
   missing and no step ran more than twice;
c) ``list`` (first page, default limit) and ``show`` (``get`` of one workflow) latency through a
   running agent's control socket, as the CLI asks: median of 50 each;
d) sequential and 32-in-flight no-op sagas per second on the history database
   (``bench/throughput.saga_run``).

Targets (PASS/FAIL; exit status 1 when one fails; a target whose size was not run is "not run"):
prune pause <= 50 ms at 100k; prune time per workflow at 100k <= 1.5 x at 10k; READY with 100k
unfinished <= 3 x empty; RSS at READY with 100k unfinished <= empty + 10 MB; list at 1M <= 2 x at
1k; sequential at 1M >= 0.9 x at 1k; database file after the 100k prune <= 2 x a fresh database
of the same rows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent import SQLiteStore, WorkflowBuilder  # noqa: E402
from agent._messages import ok_reply  # noqa: E402
from agent._schema import JOURNAL_SPAN  # noqa: E402
from agent._service import RECLAIM_SLICE_PAGES  # noqa: E402
from agent._socket import request  # noqa: E402
from agent._store import COMMAND_HASH  # noqa: E402
from bench._agent import AgentProcess, offline_config  # noqa: E402
from bench._agent import start_agent as start_agent_process  # noqa: E402
from bench.throughput import capture, renamed, saga_run  # noqa: E402

TEMPLATES = 10
KEEP = 1000
OUTBOX_CAP = 100_000  # MqttSettings.outbox_cap's default
WORKFLOW = "NoopPayment"
ID_NS = uuid.UUID("2f7c1f5e-3b8e-4d6a-9a0e-6c1d2b3a4f50")
DEFAULT_SIZES = (1_000, 10_000, 100_000, 1_000_000)
DEFAULT_UNFINISHED = (1_000, 10_000, 100_000)
SAMPLES = 50
LOOPS_DURING_PRUNE = 4


def _uid(m: int) -> str:
    return str(uuid.uuid5(ID_NS, str(m)))


# ------------------------------------------------------------------------------------------------
# Building a database of N workflows


async def _templates(path: Path, *, finished: bool) -> None:
    """Ten real workflows through the real store, each with its start command's stored reply."""
    new, transitions = await capture(WORKFLOW)
    async with SQLiteStore(path) as store:
        for i in range(TEMPLATES):
            wid = _uid(-1 - i)
            n, trs = renamed((new, transitions), wid)
            rid = f"bench-template-{i}"
            reply = ok_reply(rid, workflow_id=wid, status="ACTIVE", workflow_type=WORKFLOW)
            await store.create_instance(n._replace(request=(rid, {**reply, COMMAND_HASH: rid})))
            for tr in trs if finished else trs[:1]:
                await store.commit(tr)


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]


def _copy(
    conn: sqlite3.Connection, size: int, table: str, changed: dict[str, str], on: str
) -> None:
    """INSERT INTO table SELECT ... FROM the counter m (11..size) JOIN the template rows ``t``
    ``on``: columns in ``changed`` take their expression, the others are copied as they are."""
    cols = _columns(conn, table)
    exprs = [changed.get(c, f"t.{c}") for c in cols]
    conn.execute(
        f"WITH RECURSIVE cnt(m) AS (SELECT {TEMPLATES + 1} UNION ALL SELECT m + 1 FROM cnt "
        f"WHERE m < :n) INSERT INTO {table}({', '.join(cols)}) "
        f"SELECT {', '.join(exprs)} FROM cnt JOIN {table} t ON {on} ORDER BY m",
        {"n": size},
    )


def build(path: Path, size: int, *, finished: bool) -> float:
    """A database of ``size`` workflows (see the module's docstring); returns seconds taken."""
    t0 = time.perf_counter()
    asyncio.run(_templates(path, finished=finished))
    conn = sqlite3.connect(path, isolation_level=None)
    conn.create_function("uid", 1, _uid, deterministic=True)
    conn.execute("PRAGMA journal_mode = DELETE")
    conn.execute("PRAGMA journal_mode = OFF")
    conn.execute("PRAGMA synchronous = OFF")
    tpl = f"((m - 1) % {TEMPLATES} + 1)"  # the template of copy m (the templates are n = 1..10)
    # Copy m is created at `at`, one second after copy m - 1, the last one now; each of its
    # times keeps its distance from its template's creation.
    at = f"({time.time()} - (:n - m) * 1.0)"
    shift = f"({at} - (SELECT created_at FROM instances WHERE n = {tpl}))"
    owner = f"(SELECT id FROM instances WHERE n = {tpl})"
    conn.execute("BEGIN")
    inst = {
        "n": "m",
        "id": "uid(m)",
        "created_at": at,
        "updated_at": f"t.updated_at + {shift}",
        "finished_at": f"t.finished_at + {shift}",
    }
    _copy(conn, size, "instances", inst, f"t.n = {tpl}")
    journal = {
        "k": f"m * {JOURNAL_SPAN} + t.seq",
        "n": "m",
        "started_at": f"t.started_at + {shift}",
        "ended_at": f"t.ended_at + {shift}",
    }
    span = f"t.k BETWEEN {tpl} * {JOURNAL_SPAN} AND {tpl} * {JOURNAL_SPAN} + {JOURNAL_SPAN - 1}"
    _copy(conn, size, "journal", journal, span)
    req = {
        "request_id": "'bench-' || m",
        "reply": "json_set(t.reply, '$.workflow_id', uid(m), '$.request_id', 'bench-' || m)",
        "created_at": at,
        "workflow_id": "uid(m)",  # a column from schema 5 on
    }
    _copy(conn, size, "requests", req, f"json_extract(t.reply, '$.workflow_id') = {owner}")
    per = conn.execute("SELECT count(*) FROM outbox").fetchone()[0] / TEMPLATES or 1
    # seq NULL: numbered on, in creation order; n is a column from schema 5 on
    box = {"seq": "NULL", "workflow_id": "uid(m)", "n": "m"}
    newest = f"m > :n - {int(OUTBOX_CAP / per)} AND t.workflow_id = {owner}"
    _copy(conn, size, "outbox", box, newest)
    conn.execute("COMMIT")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.close()
    on_disk(path)
    return time.perf_counter() - t0


def on_disk(path: Path) -> None:
    """fsync ``path``: what is measured next must not wait for the whole unsynced file, which the
    first fsync of a measured commit or checkpoint (same file) would flush (75 ms for the 150 MB
    of 100k workflows here); a device's database never has that much unsynced."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def db_bytes(path: Path) -> int:
    return sum(os.path.getsize(p) for p in (path, Path(f"{path}-wal")) if p.exists())


# ------------------------------------------------------------------------------------------------
# a) prune, with workflows running through the same store


def _timed(store: SQLiteStore, spans: list[tuple[float, float]]) -> None:
    """Record when each commit of a running workflow began and ended."""
    for name in ("commit", "create_instance"):
        inner = getattr(store, name)

        async def timed(arg: Any, _inner: Any = inner) -> Any:
            t0 = time.perf_counter()
            try:
                return await _inner(arg)
            finally:
                spans.append((t0, time.perf_counter()))

        setattr(store, name, timed)


async def prune(path: Path) -> dict[str, float]:
    builder = WorkflowBuilder(definitions=[ROOT / "bench"])
    spans: list[tuple[float, float]] = []
    async with SQLiteStore(path) as store:
        _timed(store, spans)
        stop = asyncio.Event()

        async def loop() -> None:
            while not stop.is_set():
                await builder.start_workflow(WORKFLOW, store=store)

        loops = [asyncio.create_task(loop()) for _ in range(LOOPS_DURING_PRUNE)]
        await asyncio.sleep(0.5)  # the loops are running
        t0 = time.perf_counter()
        ids = await store.prune(max_finished=KEEP)
        t_pruned = time.perf_counter()
        reclaim = getattr(store, "reclaim", None)  # the space back, where the store can
        if reclaim is not None:
            await reclaim(max_pages=RECLAIM_SLICE_PAGES)  # in the retention loop's slices
        t1 = time.perf_counter()
        stop.set()
        await asyncio.gather(*loops)
        await store.checkpoint()

    def waits(a: float, b: float) -> list[float]:
        """How long each commit took that was waiting at some point between a and b."""
        return sorted(end - begin for begin, end in spans if end > a and begin < b)

    every, in_reclaim, in_prune = waits(t0, t1), waits(t_pruned, t1), waits(t0, t_pruned)
    p99 = every[min(len(every) - 1, int(len(every) * 0.99))] if every else 0.0
    return {
        "pruned": len(ids),
        "seconds": t1 - t0,
        "reclaim_s": t1 - t_pruned,
        "per_wf": (t_pruned - t0) / len(ids) if ids else float("nan"),  # the deletes alone
        "pause_max": every[-1] if every else 0.0,
        "pause_p99": p99,
        "pause_reclaim": in_reclaim[-1] if in_reclaim else 0.0,
        "pause_prune": in_prune[-1] if in_prune else 0.0,
        "pause_prune_p99": in_prune[min(len(in_prune) - 1, int(len(in_prune) * 0.99))]
        if in_prune
        else 0.0,
        "commits": len(every),
        "db_bytes": db_bytes(path),
        **_what_is_left(path),
    }


def _what_is_left(path: Path) -> dict[str, float]:
    """The finished workflows left after the prune (the 1,000 kept and those the loops ran
    meanwhile), and the size of a fresh database of exactly those rows (``VACUUM INTO``)."""
    copy = path.with_name(f"{path.stem}-fresh.db")
    conn = sqlite3.connect(path)
    try:
        live = conn.execute("SELECT count(*) FROM instances").fetchone()[0]
        conn.execute("VACUUM INTO ?", (str(copy),))
    finally:
        conn.close()
    fresh = db_bytes(copy)
    copy.unlink()
    return {"live": live, "fresh_bytes": fresh}


# ------------------------------------------------------------------------------------------------
# b), c): a real `edgesaga run`


def start_agent(directory: Path, db: Path, retention: dict[str, Any] | None = None) -> AgentProcess:
    """``edgesaga run``: time from exec to READY=1, VmRSS at READY."""
    extra = {} if retention is None else {"retention": retention}
    config = offline_config(directory, db, device_id="history", definitions=ROOT / "bench", **extra)
    return start_agent_process(config, directory, label="history", within=600)


def _count(db: Path, sql: str) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return int(conn.execute(sql).fetchone()[0])
    finally:
        conn.close()


def recovery(directory: Path, db: Path, size: int) -> dict[str, float]:
    """READY and RSS with ``size`` unfinished workflows; the time until all are COMPLETED."""
    agent = start_agent(directory, db)
    try:
        t0 = time.perf_counter()
        deadline = time.monotonic() + 3600
        while _count(db, "SELECT count(*) FROM instances WHERE status = 'COMPLETED'") < size:
            if agent.proc.poll() is not None:
                raise SystemExit(f"history: the agent exited early; see {agent.log}")
            if time.monotonic() > deadline:
                raise SystemExit(f"history: {size} workflows not completed within an hour")
            time.sleep(0.2)
        done_s = agent.ready_s + time.perf_counter() - t0
    finally:
        agent.stop()
    most = _count(
        db,
        "SELECT coalesce(max(c), 0) FROM (SELECT count(*) AS c FROM journal "
        "WHERE phase = 'forward' GROUP BY n, step)",
    )
    total = _count(db, "SELECT count(*) FROM instances")
    return {
        "ready_s": agent.ready_s,
        "rss_mb": agent.rss_kb / 1024,
        "complete_s": done_s,
        "missing": size - _count(db, "SELECT count(*) FROM instances WHERE status='COMPLETED'"),
        "extra": total - size,
        "most_runs": most,
    }


def _median_ms(ask: Callable[[], dict[str, Any]]) -> float:
    times = []
    for _ in range(SAMPLES):
        t0 = time.perf_counter()
        reply = ask()
        times.append(time.perf_counter() - t0)
        if not reply.get("ok"):
            raise SystemExit(f"history: the agent refused: {reply}")
    return statistics.median(times) * 1000


def operator_reads(directory: Path, db: Path) -> dict[str, float]:
    """``list`` and ``show`` through a running agent's control socket, as the CLI asks."""
    wid = _uid(max(TEMPLATES + 1, _count(db, "SELECT count(*) FROM instances") // 2))
    agent = start_agent(directory, db, {"max_finished": None, "max_age_days": None})
    try:
        sock = agent.socket
        for _ in range(5):  # warm: first pages read, the start-up prune's pass over
            request(sock, "list", request_id="warm")
        return {
            "list_ms": _median_ms(lambda: request(sock, "list", request_id=f"l-{uuid.uuid4()}")),
            "show_ms": _median_ms(
                lambda: request(sock, "get", request_id=f"g-{uuid.uuid4()}", workflow_id=wid)
            ),
        }
    finally:
        agent.stop()


# ------------------------------------------------------------------------------------------------
# the run


def finished_history(base: Path, size: int, seconds: float, *, prunes: bool) -> dict[str, float]:
    """c), d), and a) when ``prunes``, on one database of ``size`` finished workflows."""
    work = base / f"finished-{size}"
    work.mkdir()
    db = work / "history.db"
    out: dict[str, float] = {"build_s": build(db, size, finished=True), "db_built": db_bytes(db)}
    pruned = work / "prune.db"  # the throughput runs add workflows: prune the history as built
    if prunes:
        shutil.copyfile(db, pruned)
        on_disk(pruned)
    out |= operator_reads(work, db)
    for n, key in ((1, "seq_wf_s"), (32, "par_wf_s")):
        out[key] = asyncio.run(saga_run(work, WORKFLOW, n, seconds, "history"))["workflows_s"]
    if prunes:
        out |= {f"prune_{k}": v for k, v in asyncio.run(prune(pruned)).items()}
    shutil.rmtree(work, ignore_errors=True)
    return out


def unfinished_history(base: Path, size: int) -> dict[str, float]:
    work = base / f"unfinished-{size}"
    work.mkdir()
    db = work / "history.db"
    if size:
        build(db, size, finished=False)
    out = recovery(work, db, size) if size else _empty(work, db)
    shutil.rmtree(work, ignore_errors=True)
    return out


def _empty(work: Path, db: Path) -> dict[str, float]:
    agent = start_agent(work, db)
    agent.stop()
    return {"ready_s": agent.ready_s, "rss_mb": agent.rss_kb / 1024}


def _sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(s.replace("_", "")) for s in text.split(",") if s.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give sizes like 1000,10000") from None
    if not sizes or sizes[0] < KEEP:
        raise argparse.ArgumentTypeError(f"each size is at least {KEEP} (the prune keeps {KEEP})")
    return sizes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=_sizes, default=list(DEFAULT_SIZES))
    ap.add_argument("--unfinished-sizes", type=_sizes, default=list(DEFAULT_UNFINISHED))
    ap.add_argument(
        "--prune-up-to",
        type=int,
        default=None,
        metavar="N",
        help="prune only the histories of at most N workflows (default: every size)",
    )
    ap.add_argument("--quick", action="store_true", help="1k and 10k only")
    ap.add_argument("--seconds", type=float, default=3.0, help="seconds per throughput run")
    ap.add_argument("--dir", default=None, help="directory on the disk to measure")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes = [s for s in args.sizes if s <= 10_000] or [1_000, 10_000]
        args.unfinished_sizes = [s for s in args.unfinished_sizes if s <= 10_000] or [1_000]
    sizes = sorted({KEEP, *args.sizes})
    unfinished = sorted({KEEP, *args.unfinished_sizes})
    base_dir = Path(args.dir) if args.dir else ROOT / ".edgesaga" / "bench"
    base_dir.mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(dir=base_dir, prefix="history-"))
    try:
        hist: dict[int, dict[str, float]] = {}
        for size in sizes:
            prunes = args.prune_up_to is None or size <= args.prune_up_to
            hist[size] = finished_history(base, size, args.seconds, prunes=prunes)
            print(f"# finished {size}: {json.dumps(hist[size])}", flush=True)
        rec: dict[int, dict[str, float]] = {0: unfinished_history(base, 0)}
        for size in unfinished:
            rec[size] = unfinished_history(base, size)
            print(f"# unfinished {size}: {json.dumps(rec[size])}", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print()
    table(hist, rec)
    print()
    return 0 if targets(hist, rec) else 1


# ------------------------------------------------------------------------------------------------
# the table


def _k(n: int) -> str:
    return "empty" if n == 0 else f"{n // 1_000_000}M" if n >= 1_000_000 else f"{n // 1000}k"


ROWS_FINISHED = (
    ("prune -> 1,000: total", "prune_seconds", "s", 1),
    ("prune: per pruned workflow (no reclaim)", "prune_per_wf", "us", 1e6),
    ("prune: longest commit wait", "prune_pause_max", "ms", 1e3),
    ("prune: p99 commit wait", "prune_pause_p99", "ms", 1e3),
    ("  longest commit wait in the deletes", "prune_pause_prune", "ms", 1e3),
    ("  of which reclaim: time", "prune_reclaim_s", "s", 1),
    ("  longest commit wait in it", "prune_pause_reclaim", "ms", 1e3),
    ("db file after prune", "prune_db_bytes", "MB", 1 / 2**20),
    ("  workflows left in it", "prune_live", "", 1),
    ("  a fresh db of them (VACUUM INTO)", "prune_fresh_bytes", "MB", 1 / 2**20),
    ("list (first page), median", "list_ms", "ms", 1),
    ("show, median", "show_ms", "ms", 1),
    ("sequential workflows/s", "seq_wf_s", "/s", 1),
    ("32 in flight workflows/s", "par_wf_s", "/s", 1),
    ("db file as built", "db_built", "MB", 1 / 2**20),
    ("build time", "build_s", "s", 1),
)
ROWS_UNFINISHED = (
    ("READY with N unfinished", "ready_s", "ms", 1e3),
    ("RSS at READY", "rss_mb", "MB", 1),
    ("all N COMPLETED after", "complete_s", "s", 1),
    ("missing / not COMPLETED", "missing", "", 1),
    ("most runs of one step", "most_runs", "", 1),
)


def _cell(value: float | None, ref: float | None, unit: str, scale: float) -> str:
    if value is None or value != value:  # not run, or NaN (nothing pruned)
        return "-"
    v = value * scale
    text = f"{v:.3g} {unit}".strip() if abs(v) < 1000 else f"{v:.0f} {unit}".strip()
    if ref and ref == ref and ref != value:
        text += f" ({value / ref:.2f}x)"
    return text


def _rows(
    title: str,
    data: dict[int, dict[str, float]],
    rows: tuple[tuple[str, str, str, float], ...],
    ref: int,
) -> Iterator[str]:
    cols = sorted(data)
    yield f"| {title} | " + " | ".join(_k(c) for c in cols) + " |"
    yield "|---|" + "---|" * len(cols)
    for label, key, unit, scale in rows:
        base = data.get(ref, {}).get(key)
        yield (
            f"| {label} | "
            + " | ".join(_cell(data[c].get(key), base, unit, scale) for c in cols)
            + " |"
        )


def table(hist: dict[int, dict[str, float]], rec: dict[int, dict[str, float]]) -> None:
    print(f"History of N finished workflows (ratio: beside {_k(KEEP)} of the same run)")
    for line in _rows("N finished", hist, ROWS_FINISHED, KEEP):
        print(line)
    print()
    print("N unfinished at start (ratio: beside the empty database)")
    for line in _rows("N unfinished", rec, ROWS_UNFINISHED, 0):
        print(line)


def targets(hist: dict[int, dict[str, float]], rec: dict[int, dict[str, float]]) -> bool:
    """Print each target with PASS/FAIL (or "not run"); True when none failed."""

    def at(d: dict[int, dict[str, float]], n: int, key: str) -> float | None:
        return d.get(n, {}).get(key)

    def ratio(d: dict[int, dict[str, float]], key: str, n: int, ref: int) -> float | None:
        a, b = at(d, n, key), at(d, ref, key)
        return None if a is None or not b else a / b

    rss, empty = at(rec, 100_000, "rss_mb"), at(rec, 0, "rss_mb")
    fresh = at(hist, 100_000, "prune_fresh_bytes")
    after = at(hist, 100_000, "prune_db_bytes")
    pause = at(hist, 100_000, "prune_pause_max")
    # (what, value, limit, at least?, unit)
    checks: list[tuple[str, float | None, float, bool, str]] = [
        ("prune pause at 100k <= 50 ms", None if pause is None else pause * 1000, 50, False, " ms"),
        (
            "prune time per workflow at 100k <= 1.5 x at 10k",
            ratio(hist, "prune_per_wf", 100_000, 10_000),
            1.5,
            False,
            "x",
        ),
        (
            "READY with 100k unfinished <= 3 x empty",
            ratio(rec, "ready_s", 100_000, 0),
            3,
            False,
            "x",
        ),
        (
            "RSS at READY with 100k unfinished <= empty + 10 MB",
            None if rss is None or empty is None else rss - empty,
            10,
            False,
            " MB more",
        ),
        ("list at 1M <= 2 x at 1k", ratio(hist, "list_ms", 1_000_000, KEEP), 2, False, "x"),
        (
            "sequential at 1M >= 0.9 x at 1k",
            ratio(hist, "seq_wf_s", 1_000_000, KEEP),
            0.9,
            True,
            "x",
        ),
        (
            "db file after the 100k prune <= 2 x a fresh db of what is left",
            None if after is None or not fresh else after / fresh,
            2,
            False,
            "x",
        ),
    ]
    ok = True
    for n, r in rec.items():
        if n and (r.get("missing") or r.get("extra") or r.get("most_runs", 0) > 2):
            print(f"check {_k(n)} unfinished all COMPLETED, no step run more than twice: FAIL")
            ok = False
    for text, value, limit, at_least, unit in checks:
        if value is None:
            print(f"target {text}: not run")
            continue
        good = value >= limit if at_least else value <= limit
        ok = ok and good
        shown = f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        print(f"target {text}: {shown}{unit}  {'PASS' if good else 'FAIL'}")
    return ok


if __name__ == "__main__":
    os.environ.pop("PYTHONASYNCIODEBUG", None)
    raise SystemExit(main())
