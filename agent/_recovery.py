"""Recovery after a restart: every workflow left running is rebuilt from the store, an attempt
the agent died in is recorded as interrupted, and the workflows go on."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from agent._messages import alert
from agent._status import RESUMABLE
from agent._store import SQLiteStore, iso

if TYPE_CHECKING:  # the engine imports this module; it needs the engine's types only
    from agent._engine import Workflow, WorkflowBuilder

log = logging.getLogger("edgesaga.workflow")


async def recover(
    builder: WorkflowBuilder, store: SQLiteStore, *, run: bool = True
) -> list[Workflow]:
    """Resume every ``ACTIVE`` and ``COMPENSATING`` instance.

    An attempt cut short by the agent dying is recorded as interrupted first. With ``run=True``
    (the default) the workflows are driven to a terminal status concurrently before this
    returns; with ``run=False`` they are returned for the caller to drive.
    """
    records = await store.list_instances(status=[s.value for s in RESUMABLE], limit=1_000_000)
    workflows = []
    for rec in sorted(records, key=lambda r: (r.created_at, r.id)):
        live = builder._live.get(rec.id)
        if live is not None and live.store is store and live.is_running:
            continue
        try:
            full = await store.load_instance(rec.id)  # with its definition snapshot
            if full is None:
                continue
            wf = builder._from_record(full, store)
        except Exception as exc:
            # One instance that cannot be rebuilt (its step module was removed, say) must not
            # keep the others from resuming: it stays as it is, and a person is told.
            message = (
                f"Workflow {rec.id} ({rec.workflow_type}) cannot be resumed: {exc} It stays "
                f"{rec.status.value}; restore the code it was started with and restart the agent."
            )
            log.error(message)
            payload = alert(
                "recovery_failed",
                message,
                at=iso(time.time()),
                workflow_id=rec.id,
                workflow_type=rec.workflow_type,
            )
            await store.add_alert(dict(payload), workflow_id=rec.id)
            continue
        builder._live[rec.id] = wf
        await wf.mark_interrupted()
        workflows.append(wf)
    if run:
        await asyncio.gather(*(wf.run() for wf in workflows))
    return workflows

