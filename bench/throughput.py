"""Durability throughput: the payment saga (no-op steps) beside raw SQLite commits on the same disk.

    python bench/throughput.py [--dir DIR] [--seconds S] [--fsync-delay MS]

Prints raw commits/s (WAL + synchronous=FULL, one small insert per transaction), then for the
no-op payment saga run sequentially and with 32 in flight: workflows/s, steps/s, the ratio
steps/s ÷ raw commits/s, commits per step, and bytes written per step (write_bytes from
/proc/self/io, which counts the store thread too).

Then three floors, which replay exactly what one no-op workflow wrote (captured from a real run)
with no engine at all: the store's own statements in a bare loop on one thread, and the same
writes through the real store (writer thread, group commit), sequential and 32 in flight. The
saga's figures cannot beat these on the same machine; the gap between them is the engine's cost.

``--fsync-delay MS`` measures the same on slower storage: it compiles ``bench/slow_fsync.c`` with
the system C compiler and runs again with it preloaded, so that every ``fsync``/``fdatasync`` in the
process (the raw reference's and the store's alike) takes MS milliseconds longer. That stands in
for a Raspberry Pi's SD card, whose flush takes milliseconds, on a machine whose disk flushes in a
fraction of one; the raw commits/s printed shows what a flush then costs.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent import SQLiteStore, WorkflowBuilder  # noqa: E402
from agent._store import NewInstance, Transition  # noqa: E402

STEPS_PER_WORKFLOW = 4
DELAY_ENV = "EDGESAGA_BENCH_FSYNC_DELAY_US"  # read by bench/slow_fsync.c


def write_bytes() -> int:
    with open("/proc/self/io") as fh:
        for line in fh:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    return 0


def raw_commits(directory: Path, seconds: float) -> tuple[float, float]:
    path = directory / "raw.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v TEXT)")
    n = 0
    bytes0 = write_bytes()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t (v) VALUES (?)", ("x" * 50,))
        conn.execute("COMMIT")
        n += 1
    rate = n / (time.perf_counter() - start)
    written = (write_bytes() - bytes0) / n
    conn.close()
    return rate, written


# ------------------------------------------------------------------------------------------------
# Floors: what one workflow writes, replayed without the engine, so the saga figures can be read
# against the best this schema (and this store) can do on this machine.


async def capture(workflow_type: str) -> tuple[NewInstance, list[Transition]]:
    """Run one workflow through the real engine on a scratch store and keep what it wrote."""
    builder = WorkflowBuilder(definitions=[ROOT / "bench"])
    writes: list[Any] = []
    with tempfile.TemporaryDirectory() as tmp:
        async with SQLiteStore(Path(tmp) / "capture.db") as store:
            create, commit = store.create_instance, store.commit

            async def create_instance(new: NewInstance) -> bool:
                writes.append(copy.deepcopy(new))
                return await create(new)

            async def commit_one(tr: Transition) -> None:
                writes.append(copy.deepcopy(tr))
                await commit(tr)

            store.create_instance = create_instance  # type: ignore[method-assign]
            store.commit = commit_one  # type: ignore[method-assign]
            await builder.start_workflow(workflow_type, store=store)
    return writes[0], writes[1:]


def renamed(
    shape: tuple[NewInstance, list[Transition]], workflow_id: str
) -> tuple[NewInstance, list[Transition]]:
    new, transitions = shape

    def again(tr: Transition) -> Transition:  # the store numbers events in their dicts: copy them
        events = [(kind, dict(payload)) for kind, payload in tr.events]
        return tr._replace(workflow_id=workflow_id, events=events)

    return new._replace(id=workflow_id, first=again(new.first)), [again(tr) for tr in transitions]


def sql_floor(
    directory: Path, shape: tuple[NewInstance, list[Transition]], seconds: float
) -> dict[str, float]:
    """The store's own statements for each commit, run in a bare loop on one thread."""
    store = SQLiteStore(directory / "floor-sql.db", exclusive=False)
    conn = store._connect()
    done = commits = 0
    bytes0 = write_bytes()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        new, transitions = renamed(shape, str(uuid.uuid4()))
        for write in (new, *transitions):
            conn.execute("BEGIN IMMEDIATE")
            if isinstance(write, NewInstance):
                store._create(conn, write)
            else:
                store._apply(conn, write)
            conn.execute("COMMIT")
            commits += 1
        done += 1
    elapsed = time.perf_counter() - start
    conn.close()
    return rates(done, elapsed, commits, write_bytes() - bytes0)


def rates(done: int, elapsed: float, commits: int, written: int) -> dict[str, float]:
    steps = done * STEPS_PER_WORKFLOW
    return {
        "workflows_s": done / elapsed,
        "steps_s": steps / elapsed,
        "commits_per_step": commits / steps,
        "bytes_per_step": written / steps,
    }


async def in_flight_run(
    store: SQLiteStore, in_flight: int, seconds: float, one: Callable[[], Awaitable[None]]
) -> dict[str, float]:
    """``one()`` (a whole workflow) again and again in ``in_flight`` concurrent loops."""
    commits0, bytes0 = store.commits, write_bytes()
    done = 0
    start = time.perf_counter()
    deadline = start + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await one()
            done += 1

    await asyncio.gather(*(worker() for _ in range(in_flight)))
    elapsed = time.perf_counter() - start
    return rates(done, elapsed, store.commits - commits0, write_bytes() - bytes0)


async def store_floor(
    directory: Path,
    shape: tuple[NewInstance, list[Transition]],
    in_flight: int,
    seconds: float,
    name: str,
) -> dict[str, float]:
    """The same writes through the real store (writer thread, group commit), no engine."""
    async with SQLiteStore(directory / f"{name}.db") as store:

        async def one() -> None:
            new, transitions = renamed(shape, str(uuid.uuid4()))
            await store.create_instance(new)
            for tr in transitions:
                await store.commit(tr)

        return await in_flight_run(store, in_flight, seconds, one)


async def saga_run(
    directory: Path, workflow_type: str, in_flight: int, seconds: float, name: str
) -> dict[str, float]:
    builder = WorkflowBuilder(definitions=[ROOT / "bench"])
    async with SQLiteStore(directory / f"{name}.db") as store:
        # warm up (imports, first pages)
        for _ in range(5):
            await builder.start_workflow(workflow_type, store=store)

        async def one() -> None:
            wf = await builder.start_workflow(workflow_type, store=store)
            assert wf.status == "COMPLETED", wf.status

        return await in_flight_run(store, in_flight, seconds, one)


def row(label: str, r: dict[str, float]) -> None:
    print(
        f"{label:<34}{r['raw_s']:8.0f}{r['workflows_s']:8.0f}{r['steps_s']:10.0f}"
        f"{r['steps_s'] / r['raw_s']:8.2f}{r['commits_per_step']:14.2f}{r['bytes_per_step']:12.0f}"
    )


def beside_raw(
    directory: Path, seconds: float, run: Callable[[], dict[str, float]]
) -> dict[str, float]:
    """``run()`` between two raw-commit measurements of half its length, whose mean is its
    reference: the disk and the machine's load drift during a run of several minutes."""
    before, _ = raw_commits(directory, seconds / 2)
    result = run()
    after, _ = raw_commits(directory, seconds / 2)
    return {**result, "raw_s": (before + after) / 2}


def slower_storage(delay_ms: float) -> None:
    """Run this benchmark again in a process whose fsync()/fdatasync() are slower (see above)."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise SystemExit("throughput: --fsync-delay needs a C compiler (apt-get install gcc).")
    build = Path(tempfile.mkdtemp(prefix="edgesaga-slow-fsync-"))
    shim = build / "slow_fsync.so"
    subprocess.run(
        [
            compiler,
            "-shared",
            "-fPIC",
            "-O2",
            "-o",
            str(shim),
            str(ROOT / "bench" / "slow_fsync.c"),
            "-ldl",
        ],
        check=True,
    )
    env = dict(os.environ)
    env[DELAY_ENV] = str(round(delay_ms * 1000))
    env["LD_PRELOAD"] = " ".join(filter(None, (str(shim), env.get("LD_PRELOAD"))))
    try:
        code = subprocess.run([sys.executable, __file__, *sys.argv[1:]], env=env).returncode
    finally:
        shutil.rmtree(build, ignore_errors=True)
    raise SystemExit(code)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--dir", default=None, help="directory on the disk to measure (default: ./.edgesaga/bench)"
    )
    ap.add_argument("--seconds", type=float, default=4.0, help="seconds per measurement")
    ap.add_argument(
        "--fsync-delay",
        type=float,
        default=0.0,
        metavar="MS",
        help="make every fsync take MS ms longer (slower storage, e.g. an SD card); needs a C compiler",
    )
    args = ap.parse_args()
    if args.fsync_delay > 0 and DELAY_ENV not in os.environ:
        slower_storage(args.fsync_delay)  # does not return
    base = Path(args.dir) if args.dir else ROOT / ".edgesaga" / "bench"
    base.mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(dir=base))
    secs = args.seconds
    try:
        raw, raw_bytes = raw_commits(directory, secs)
        print(f"disk: {directory}")
        if DELAY_ENV in os.environ:
            delay_ms = int(os.environ[DELAY_ENV]) / 1000
            print(
                f"SIMULATED slower storage: every fsync/fdatasync takes {delay_ms:g} ms longer "
                f"(bench/slow_fsync.c preloaded); a raw commit takes {1000 / raw:.2f} ms"
            )
        print(
            f"raw SQLite commits/s (WAL, synchronous=FULL, 1 insert/txn): {raw:8.0f}"
            f"   ({raw_bytes:.0f} bytes written per commit)"
        )
        print("each row's ÷ raw is against raw/s: raw commits measured just before and after it")
        print()
        print(
            f"{'run':<34}{'raw/s':>8}{'wf/s':>8}{'steps/s':>10}{'÷ raw':>8}{'commits/step':>14}"
            f"{'bytes/step':>12}"
        )
        results: dict[str, dict[str, float]] = {}
        for label, wtype, n in (
            ("async no-op, sequential", "NoopPayment", 1),
            ("async no-op, 32 in flight", "NoopPayment", 32),
            ("sync (thread) no-op, sequential", "NoopPaymentSync", 1),
            ("sync (thread) no-op, 32 in flight", "NoopPaymentSync", 32),
        ):
            r = beside_raw(
                directory,
                secs,
                lambda wtype=wtype, n=n: asyncio.run(
                    saga_run(directory, wtype, n, secs, f"{wtype}-{n}")
                ),
            )
            results[label] = r
            row(label, r)
        print()
        print("floors: what the async no-op saga writes, replayed with no engine")
        shape = asyncio.run(capture("NoopPayment"))
        row(
            "bare loop, one thread, sequential",
            beside_raw(directory, secs, lambda: sql_floor(directory, shape, secs)),
        )
        for n in (1, 32):
            r = beside_raw(
                directory,
                secs,
                lambda n=n: asyncio.run(store_floor(directory, shape, n, secs, f"floor-{n}")),
            )
            row("store, sequential" if n == 1 else "store, 32 in flight", r)
        print()
        seq, par = results["async no-op, sequential"], results["async no-op, 32 in flight"]
        checks = [
            (
                "sequential steps/s ≥ 0.60 × raw commits/s",
                seq["steps_s"] / seq["raw_s"],
                0.60,
                True,
            ),
            ("32 in flight steps/s ≥ 2 × raw commits/s", par["steps_s"] / par["raw_s"], 2.0, True),
            ("bytes written per step ≤ 12288, sequential", seq["bytes_per_step"], 12288, False),
            ("bytes written per step ≤ 12288, 32 in flight", par["bytes_per_step"], 12288, False),
        ]
        for text, value, target, at_least in checks:
            ok = value >= target if at_least else value <= target
            print(f"target {text}: {value:.2f}  {'PASS' if ok else 'FAIL'}")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    os.environ.pop("PYTHONASYNCIODEBUG", None)  # debug mode would measure asyncio's checks
    main()
