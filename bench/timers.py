"""Timers: what 10,000 workflows waiting in a DELAY cost a real agent (DESIGN §11, issue 14).

    python bench/timers.py [--count 10000] [--idle-seconds 60] [--lead 20] [--spread 60]
                           [--dir DIR]

**How the waiting workflows are made** (fast, from a real row): one workflow of a two-step type
(``Wait``, a DELAY; then ``Done``, a no-op) is created through the real builder and store, which
arms its durable timer in the commit that begins the DELAY (the ``TimerMark`` in its Progress).
Its mark is then set to fall due ``--lead`` seconds from now (wall and boot-time deadline, and the
time left) and, on one plain ``sqlite3`` connection, ``INSERT ... SELECT`` over a recursive counter
copies its ``instances`` and ``journal`` rows up to N. For the lateness run one ``UPDATE`` then
spreads the marks' deadlines uniformly over ``--spread`` seconds (default 60) after the lead, as
real DELAYs end; ``--spread 0`` leaves all N due at the same instant (the worst case, shown as a
separate, labelled figure that is not the target).

**What is measured**, each figure beside the agent with an empty database:

a) *RSS*: ``VmRSS`` of a real ``edgesaga run`` once all N timers are registered (the status
   command's timer count), minus the same agent's with no workflow; per waiting workflow;
b) *recovery*: exec to READY=1, and to all N registered with the timer service;
c) *idle wake-ups*: CPU time (utime + stime, /proc/PID/stat) and voluntary context switches
   (/proc/PID/status) over ``--idle-seconds`` of the agent idle with N timers due in an hour,
   against the empty agent over the same window;
d) *lateness at the fire*: with the timers due from ``--lead`` seconds after the build, over
   ``--spread`` seconds, each workflow's commit that completes its DELAY minus its own wall
   deadline, p50 / p99 / max over all N. The engine records that commit's time as the
   ``started_at`` of the step after the DELAY (``Done``): the DELAY's completion and the next
   step's start are one commit, stamped with the time its drive saw the timer due.

Targets (PASS/FAIL; exit status 1 when one fails): < 2 KB RSS per waiting workflow; all N
recovered in < 5 s; lateness p99 < 100 ms; idle CPU time and voluntary context switches with N
timers no more than the empty agent's (plus 10 % and a small allowance for noise: 20 ms CPU,
20 switches).
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
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent import SQLiteStore, WorkflowBuilder  # noqa: E402
from agent._schema import JOURNAL_SPAN  # noqa: E402
from agent._socket import request  # noqa: E402
from bench._agent import AgentProcess, _proc_status, offline_config  # noqa: E402
from bench._agent import start_agent as start_agent_process  # noqa: E402

WORKFLOW = "TimerWait"
DEFINITION = f"""\
# Written by bench/timers.py: a DELAY, then a no-op step.
workflow_type: {WORKFLOW}
workflow_version: "1.0.0"
initial_state_model: bench.noop_steps.NoopState
steps:
  - name: Wait
    type: DELAY
    duration: 3600
  - name: Done
    function: bench.noop_steps.step
"""
ID_NS = uuid.UUID("6a0d8f3e-1c2b-4e5f-8a9b-0c1d2e3f4a5b")
HOUR = 3600.0
TICK = os.sysconf("SC_CLK_TCK")


def _uid(m: int) -> str:
    return str(uuid.uuid5(ID_NS, str(m)))


# ------------------------------------------------------------------------------------------------
# Building a database of N workflows waiting in the DELAY


def _armed(db: Path) -> bool:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT progress FROM instances WHERE n = 1").fetchone()
    finally:
        conn.close()
    return row is not None and _find_mark(json.loads(row[0])) is not None


async def _template(directory: Path, db: Path) -> None:
    """One workflow driven by the real engine until its DELAY's timer is committed."""
    builder = WorkflowBuilder(definitions=[directory / "defs"])
    async with SQLiteStore(db) as store:
        wf = await builder.create_workflow(WORKFLOW, store=store, workflow_id=_uid(1))
        task = asyncio.create_task(wf.run())  # without a timer service it waits in-process
        try:
            for _ in range(500):
                if _armed(db):
                    break
                await asyncio.sleep(0.01)
            else:
                raise SystemExit(
                    "timers: the DELAY's Progress holds no timer mark (wall_deadline, "
                    "boottime_deadline); this agent does not arm durable timers."
                )
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def _find_mark(node: Any) -> dict[str, Any] | None:
    """The TimerMark in a Progress JSON: the object holding a ``boottime_deadline``."""
    if isinstance(node, dict):
        if "boottime_deadline" in node and "wall_deadline" in node:
            return node
        children: list[Any] = list(node.values())
    elif isinstance(node, list):
        children = node
    else:
        return None
    for child in children:
        found = _find_mark(child)
        if found is not None:
            return found
    return None


def _due_in(conn: sqlite3.Connection, lead: float) -> tuple[float, float]:
    """Set the template's mark due ``lead`` seconds from now; returns the wall deadline and the
    mark's ``since`` (what recovery's rebase moves on)."""
    (text,) = conn.execute("SELECT progress FROM instances WHERE n = 1").fetchone()
    progress = json.loads(text)
    mark = _find_mark(progress)
    if mark is None:
        raise SystemExit(
            "timers: the DELAY's Progress holds no timer mark (wall_deadline, "
            "boottime_deadline); this agent does not arm durable timers yet."
        )
    wall = time.time() + lead
    mark["wall_deadline"] = wall
    mark["boottime_deadline"] = time.clock_gettime(time.CLOCK_BOOTTIME) + lead
    mark["remaining"] = lead
    conn.execute("UPDATE instances SET progress = ? WHERE n = 1", (json.dumps(progress),))
    return wall, float(mark["since"])


def _copy(conn: sqlite3.Connection, size: int, table: str, changed: dict[str, str]) -> None:
    cols = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
    exprs = [changed.get(c, f"t.{c}") for c in cols]
    conn.execute(
        "WITH RECURSIVE cnt(m) AS (SELECT 2 UNION ALL SELECT m + 1 FROM cnt WHERE m < :n) "
        f"INSERT INTO {table}({', '.join(cols)}) SELECT {', '.join(exprs)} "
        f"FROM cnt JOIN {table} t ON t.n = 1 ORDER BY m",
        {"n": size},
    )


def offset(n: int, size: int, spread: float) -> float:
    """Seconds after the first deadline at which workflow ``n`` (1..size) falls due."""
    return spread * (n - 1) / size


def _spread(conn: sqlite3.Connection, size: int, spread: float) -> None:
    """Move each copy's deadline on by ``offset(n)``: wall and boot-time deadline, time left."""
    conn.create_function("off", 1, lambda n: offset(int(n), size, spread), deterministic=True)
    changed = conn.execute(
        "UPDATE instances SET progress = json_set(progress, "
        "'$.timer.wall_deadline', json_extract(progress, '$.timer.wall_deadline') + off(n), "
        "'$.timer.boottime_deadline', json_extract(progress, '$.timer.boottime_deadline') + off(n), "
        "'$.timer.remaining', json_extract(progress, '$.timer.remaining') + off(n)) "
        "WHERE json_extract(progress, '$.timer.wall_deadline') IS NOT NULL"
    ).rowcount
    if changed != size:
        raise SystemExit(f"timers: {changed} of {size} timer marks at $.timer; cannot spread them.")


def build(
    directory: Path, db: Path, size: int, lead: float, spread: float = 0.0
) -> tuple[float, float]:
    """``size`` workflows waiting in the DELAY, due from ``lead`` s from now over ``spread`` s
    (workflow n at ``offset(n)``): (the first wall deadline, the marks' ``since``)."""
    if db.exists():
        db.unlink()
    asyncio.run(_template(directory, db))
    conn = sqlite3.connect(db, isolation_level=None)
    conn.create_function("uid", 1, _uid, deterministic=True)
    conn.execute("PRAGMA journal_mode = DELETE")
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("BEGIN")
    wall, since = _due_in(conn, lead)
    if size > 1:  # the counter starts at 2: with one workflow the template is all
        _copy(conn, size, "instances", {"n": "m", "id": "uid(m)"})
        _copy(conn, size, "journal", {"k": f"m * {JOURNAL_SPAN} + t.seq", "n": "m"})
    if spread > 0:
        _spread(conn, size, spread)
    conn.execute("COMMIT")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.close()
    return wall, since


# ------------------------------------------------------------------------------------------------
# The agent


def start_agent(directory: Path, db: Path) -> AgentProcess:
    """``edgesaga run`` with this script as its NOTIFY_SOCKET; returns at READY=1."""
    config = offline_config(directory, db, device_id="timers", definitions=directory / "defs")
    return start_agent_process(config, directory, label="timers", within=300)


def timer_count(status: dict[str, Any]) -> int | None:
    """The number of waiting timers in a status reply (``timers`` as a number, or an object
    with a ``count`` / ``waiting``), wherever the reply nests it; None when it says nothing."""
    stack: list[Any] = [status]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "timers" and isinstance(value, int) and not isinstance(value, bool):
                    return value
                if key == "timers" and isinstance(value, dict):
                    for sub in ("count", "waiting", "total"):
                        if isinstance(value.get(sub), int):
                            return int(value[sub])
                stack.append(value)
    return None


def _rebased(db: Path, since: float) -> int:
    """How many timers recovery has rebased onto this run (their ``since`` moved on)."""
    return _count(
        db,
        f"SELECT count(*) FROM instances WHERE json_extract(progress, '$.timer.since') > {since!r}",
    )


def wait_registered(agent: AgentProcess, db: Path, size: int, since: float) -> tuple[float, str]:
    """Seconds from exec until all ``size`` timers are registered, and how it was seen: the
    status's timer count when it has one, else every mark rebased in the database (recovery
    commits the rebase, then hands the timer to the timer service)."""
    deadline = time.monotonic() + 120
    how = "status timer count"
    while time.monotonic() < deadline:
        agent.alive()
        try:
            count = timer_count(request(agent.socket, "status", timeout=10))
        except OSError:
            count = -1
        if count is None:
            how = "all marks rebased (database)"
            count = _rebased(db, since)
        if count >= size:
            return time.perf_counter() - agent.started, how
        time.sleep(0.02)
    raise SystemExit(f"timers: {size} timers not registered within 120 s; see {agent.log}")


def cpu_and_switches(pid: int) -> tuple[float, int]:
    """(utime + stime in seconds, voluntary context switches) of ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rpartition(")")[2].split()
    cpu = (int(fields[11]) + int(fields[12])) / TICK  # utime, stime: fields 14 and 15
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("voluntary_ctxt_switches:"):
                return cpu, int(line.split()[1])
    raise SystemExit("timers: /proc/PID/status has no voluntary_ctxt_switches line.")


def idle(agent: AgentProcess, seconds: float) -> tuple[float, int]:
    cpu0, sw0 = cpu_and_switches(agent.proc.pid)
    time.sleep(seconds)
    agent.alive()
    cpu1, sw1 = cpu_and_switches(agent.proc.pid)
    return cpu1 - cpu0, sw1 - sw0


def _count(db: Path, sql: str) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return int(conn.execute(sql).fetchone()[0])
    finally:
        conn.close()


def lateness(db: Path, wall: float, size: int, spread: float, agent: AgentProcess) -> list[float]:
    """Wait until every workflow completed; for each, the commit that completed its DELAY (the
    Done step's ``started_at``) minus its own wall deadline (s)."""
    deadline = time.monotonic() + 300 + spread + max(0.0, wall - time.time())
    done = "SELECT count(*) FROM instances WHERE status = 'COMPLETED'"
    while _count(db, done) < size:
        agent.alive()
        if time.monotonic() > deadline:
            raise SystemExit(f"timers: not all {size} workflows completed in time; see {agent.log}")
        time.sleep(0.2)
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT n, min(started_at) FROM journal WHERE step = 'Done' AND phase = 'forward' "
            "GROUP BY n"
        ).fetchall()
    finally:
        conn.close()
    if len(rows) != size:
        raise SystemExit(f"timers: {len(rows)} Done steps in the journal, not {size}.")
    return sorted(float(at) - (wall + offset(int(n), size, spread)) for n, at in rows)


# ------------------------------------------------------------------------------------------------
# The run


def measure(work: Path, size: int, idle_s: float, lead: float, spread: float) -> dict[str, Any]:
    db = work / "timers.db"
    out: dict[str, Any] = {}
    # the same agent with no workflow at all
    empty = start_agent(work, work / "empty.db")
    try:
        time.sleep(1.0)  # past the start-up's own work
        out["empty_rss_kb"] = _proc_status(empty.proc.pid)["VmRSS"]
        out["empty_ready_s"] = empty.ready_s
        out["empty_cpu_s"], sw = idle(empty, idle_s)
        out["empty_switches"] = sw
    finally:
        empty.stop()
    # N timers due in an hour: recovery, RSS, idle wake-ups
    _, since = build(work, db, size, HOUR)
    agent = start_agent(work, db)
    try:
        out["ready_s"] = agent.ready_s
        out["registered_s"], out["registered_by"] = wait_registered(agent, db, size, since)
        time.sleep(1.0)
        out["rss_kb"] = _proc_status(agent.proc.pid)["VmRSS"]
        out["cpu_s"], sw = idle(agent, idle_s)
        out["switches"] = sw
    finally:
        agent.stop()
    # N timers due `lead` seconds from now: how late they fire
    wall, _ = build(work, db, size, lead, spread)
    agent = start_agent(work, db)
    try:
        if time.time() >= wall:
            raise SystemExit(
                f"timers: the agent was READY after the deadline; give --lead > {lead}."
            )
        late = lateness(db, wall, size, spread, agent)
    finally:
        agent.stop()
    if late[0] < 0:
        raise SystemExit(f"timers: a DELAY completed {-late[0] * 1000:.1f} ms EARLY.")
    out["late_p50_ms"] = statistics.median(late) * 1000
    out["late_p99_ms"] = late[min(len(late) - 1, int(len(late) * 0.99))] * 1000
    out["late_max_ms"] = late[-1] * 1000
    return out


def report(r: dict[str, Any], size: int, spread: float) -> bool:
    """Print each figure beside its reference and target; False when a target fails."""
    per_kb = (r["rss_kb"] - r["empty_rss_kb"]) / size
    reg = r["registered_s"]
    rows: list[tuple[str, str, str, str, bool | None]] = [
        (
            "RSS per waiting workflow",
            f"{per_kb * 1024:.0f} B",
            f"agent {r['rss_kb'] / 1024:.1f} MB vs empty {r['empty_rss_kb'] / 1024:.1f} MB",
            "< 2 KB",
            per_kb < 2.0,
        ),
        (
            "READY (exec to READY=1)",
            f"{r['ready_s']:.2f} s",
            f"empty {r['empty_ready_s']:.2f} s",
            "",
            None,
        ),
        (
            f"all {size:,} registered",
            f"{reg:.2f} s",
            f"from exec; {r['registered_by']}",
            "< 5 s",
            reg < 5.0,
        ),
        (
            "lateness at the fire" if spread > 0 else "lateness, all at once",
            f"{r['late_p50_ms']:.1f} / {r['late_p99_ms']:.1f} / {r['late_max_ms']:.1f} ms",
            f"p50/p99/max; due over {spread:g} s"
            if spread > 0
            else "p50/p99/max; worst case, not the target",
            "p99 < 100 ms" if spread > 0 else "",
            r["late_p99_ms"] < 100.0 if spread > 0 else None,
        ),
    ]
    cpu, cpu0 = r["cpu_s"], r["empty_cpu_s"]
    sw, sw0 = r["switches"], r["empty_switches"]
    rows += [
        (
            "idle CPU time",
            f"{cpu * 1000:.0f} ms",
            f"empty {cpu0 * 1000:.0f} ms",
            "<= empty",
            cpu <= cpu0 * 1.1 + 0.02,
        ),
        (
            "idle voluntary switches",
            f"{sw:.0f}",
            f"empty {sw0:.0f}",
            "<= empty",
            sw <= sw0 * 1.1 + 20,
        ),
    ]
    print(f"{'figure':<28} {'value':<26} {'reference':<40} {'target':<13} result")
    ok = True
    for name, value, ref, target, passed in rows:
        verdict = (
            ""
            if passed is None and not target
            else ("not run" if passed is None else ("PASS" if passed else "FAIL"))
        )
        ok = ok and passed is not False
        print(f"{name:<28} {value:<26} {ref:<40} {target:<13} {verdict}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--count", type=int, default=10_000, help="waiting workflows (default 10,000)"
    )
    parser.add_argument("--idle-seconds", type=float, default=60.0, help="idle window (default 60)")
    parser.add_argument(
        "--lead", type=float, default=20.0, help="seconds from build to due (default 20)"
    )
    parser.add_argument(
        "--spread",
        type=float,
        default=60.0,
        help="seconds the deadlines are spread over (default 60; 0: all due at once)",
    )
    parser.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")
    args = parser.parse_args(argv)
    if (
        not 1 <= args.count <= 1_000_000
        or not 0 < args.idle_seconds <= 3600
        or not 2 <= args.lead <= 600
        or not 0 <= args.spread <= 3600
    ):
        parser.error("--count 1..1000000, --idle-seconds 0..3600, --lead 2..600, --spread 0..3600")
    work = args.dir or Path(tempfile.mkdtemp(prefix="edgesaga-timers-"))
    (work / "defs").mkdir(parents=True, exist_ok=True)
    (work / "defs" / "timer_wait.yaml").write_text(DEFINITION)
    try:
        print(
            f"Timers: {args.count:,} workflows waiting in a DELAY; idle window {args.idle_seconds:g} s"
        )
        result = measure(work, args.count, args.idle_seconds, args.lead, args.spread)
        ok = report(result, args.count, args.spread)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
