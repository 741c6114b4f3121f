"""Run or recover the CrashTest workflow in a process of its own (the crash tests SIGKILL it).

    python tests/crash/runner.py start --db PATH --ledger PATH [--data JSON] [--workflow-id ID]
    python tests/crash/runner.py recover --db PATH --ledger PATH

Prints one JSON line, ``{"statuses": {workflow_id: status}}``, when it ends normally.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # so `tests.crash.steps` imports when run as a script
    sys.path.insert(0, str(ROOT))

from agent import SQLiteStore, WorkflowBuilder  # noqa: E402 - needs the path above

DEFINITIONS = ROOT / "tests" / "crash"


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("command", choices=["start", "recover"])
    parser.add_argument("--db", required=True)
    parser.add_argument("--ledger", required=True)
    parser.add_argument("--data", default="{}")
    parser.add_argument("--workflow-id", default=None)
    args = parser.parse_args(argv)

    builder = WorkflowBuilder(definitions=[DEFINITIONS])
    async with SQLiteStore(args.db) as store:
        if args.command == "start":
            data = {**json.loads(args.data), "ledger": args.ledger}
            wf = await builder.create_workflow(
                "CrashTest", data, store=store, workflow_id=args.workflow_id
            )
            if data.get("kill_after_create"):
                os.kill(os.getpid(), signal.SIGKILL)
            await wf.run()
            statuses = {wf.id: wf.status.value}
        else:
            statuses = {wf.id: wf.status.value for wf in await builder.recover(store)}
    print(json.dumps({"statuses": statuses}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
