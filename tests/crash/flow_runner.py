"""Drive the control-flow crash workflows (tests/flows/crashflow) in a process of its own, which
the tests of tests/test_flow_crash.py SIGKILL.

    python tests/crash/flow_runner.py start   --db PATH --ledger PATH --type T --workflow-id ID
                                              [--data JSON] [--hold]
    python tests/crash/flow_runner.py recover --db PATH --ledger PATH [--hold]
    python tests/crash/flow_runner.py resume  --db PATH --ledger PATH --workflow-id ID --data JSON
                                              [--kill-after-resume]
    python tests/crash/flow_runner.py retry   --db PATH --ledger PATH --workflow-id ID
    python tests/crash/flow_runner.py cancel  --db PATH --ledger PATH --workflow-id ID

Prints one JSON line when it ends normally: ``{"statuses": {workflow_id: status}}``, or
``{"error": {"code": ..., "message": ...}}`` when the agent refused the command. ``--hold``: once
driving stops, note ``runner:held`` in the ledger and sleep, for the test to kill the process
(a PAUSED workflow killed while it waits). ``--kill-after-resume``: SIGKILL this process as soon
as ``resume`` has been accepted (committed), before the workflow is driven on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # so `tests.flows.crashflow` imports when run as a script
    sys.path.insert(0, str(ROOT))

from agent import AgentError, SQLiteStore, Workflow, WorkflowBuilder  # noqa: E402 - needs the path

DEFINITIONS = ROOT / "tests" / "flows" / "crashflow"
HELD = "runner:held"


def _note(ledger: str, line: str) -> None:
    with open(ledger, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())


async def _command(args: argparse.Namespace, builder: WorkflowBuilder, store: SQLiteStore) -> Any:
    """Carry out one command; the workflows it drove."""
    if args.command == "start":
        data = {**json.loads(args.data), "ledger": args.ledger}
        wf = await builder.create_workflow(
            args.type, data, store=store, workflow_id=args.workflow_id
        )
        await wf.run()
        return [wf]
    if args.command == "recover":
        return await builder.recover(store)
    if args.command == "resume":
        wf = await builder.resume(store, args.workflow_id, json.loads(args.data))
        if args.kill_after_resume:
            os.kill(os.getpid(), signal.SIGKILL)
            await asyncio.sleep(60)  # not reached: SIGKILL cannot be caught
        await wf.run()
        return [wf]
    if args.command == "cancel":
        wf = await builder.cancel(args.workflow_id, store)
        await wf.wait()
        return [wf]
    wf = await builder.retry(args.workflow_id, store)
    return [wf]


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("command", choices=["start", "recover", "resume", "retry", "cancel"])
    parser.add_argument("--db", required=True)
    parser.add_argument("--ledger", required=True)
    parser.add_argument("--type", default=None)
    parser.add_argument("--data", default="{}")
    parser.add_argument("--workflow-id", default=None)
    parser.add_argument("--hold", action="store_true")
    parser.add_argument("--kill-after-resume", action="store_true")
    args = parser.parse_args(argv)

    builder = WorkflowBuilder(definitions=[DEFINITIONS])
    async with SQLiteStore(args.db) as store:
        try:
            workflows: list[Workflow] = await _command(args, builder, store)
        except AgentError as exc:
            print(json.dumps({"error": {"code": exc.code, "message": str(exc)}}), flush=True)
            return 0
        if args.hold:
            _note(args.ledger, HELD)
            await asyncio.sleep(60)  # the test kills the process here
    print(json.dumps({"statuses": {wf.id: wf.status.value for wf in workflows}}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
