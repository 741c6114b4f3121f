"""A full disk pauses work instead of corrupting it (SQLite's own SQLITE_FULL, via max_page_count)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from agent import DiskFull, SQLiteStore, WorkflowBuilder

ROOT = Path(__file__).resolve().parents[1]
DATA = {"order_id": "O1", "customer_id": "C1", "amount": 1.0}


async def _cap_pages(store: SQLiteStore, extra: int) -> int:
    """Let the database file grow by at most ``extra`` more pages (0: it is "full" now)."""

    def fn(conn):
        count = conn.execute("PRAGMA page_count").fetchone()[0]
        return conn.execute(f"PRAGMA max_page_count = {count + extra}").fetchone()[0]

    return await store.read(fn)


async def test_a_full_database_pauses_workflows_and_they_resume_when_space_returns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="edgesaga.workflow")
    builder = WorkflowBuilder(definitions=[ROOT / "workflows" / "payment"])
    async with SQLiteStore(tmp_path / "db") as store:
        workflows = [
            await builder.create_workflow("PaymentProcessing", DATA, store=store) for _ in range(40)
        ]
        await _cap_pages(store, 0)  # the disk is full from here on
        tasks = [asyncio.create_task(wf.run()) for wf in workflows]
        for _ in range(100):  # until some transition found the disk full and backed off
            if any("is full" in r.getMessage() for r in caplog.records):
                break
            await asyncio.sleep(0.05)
        assert any("is full" in r.getMessage() for r in caplog.records)
        await asyncio.sleep(0.3)
        paused = [wf for wf, t in zip(workflows, tasks, strict=True) if not t.done()]
        assert paused, "every workflow finished although the disk was full"
        assert all(wf.status == "ACTIVE" for wf in paused)  # paused, not failed

        # a new workflow cannot be created meanwhile; it says so and writes nothing
        before = len(await store.list_instances(limit=1000))
        with pytest.raises(DiskFull, match="work is paused until space is freed"):
            await builder.create_workflow("PaymentProcessing", DATA, store=store)
        assert len(await store.list_instances(limit=1000)) == before

        await _cap_pages(store, 10_000)  # space is freed
        statuses = await asyncio.wait_for(asyncio.gather(*tasks), 30)
        assert set(statuses) == {"COMPLETED"}
        for wf in paused:
            journal = await store.journal(wf.id)
            assert [(j.step, j.outcome) for j in journal] == [
                ("Create_Order", "completed"),
                ("Charge_Payment", "completed"),
                ("Reserve_Inventory", "completed"),
                ("Create_Shipment", "completed"),
            ]
            rec = await store.load_instance(wf.id)
            assert rec is not None
            assert rec.status == "COMPLETED"
            assert rec.state["shipment_created"] is True
