"""``SQLiteStore.load_instances`` (many instances with one query) and the builder's public
``rebuild``, ``release`` and ``known_plan``, which recovery and the timer service use instead of
the builder's and the store's private members.

Every test uses a real SQLite file in ``tmp_path``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from _engine_fixtures import PAYMENT_DATA, PAYMENT_DIR, step, write_definition

from agent import SQLiteStore, WorkflowBuilder, WorkflowStatus
from agent._timers import FIRE_PAGE


@pytest.fixture
def builder(tmp_path: Path) -> WorkflowBuilder:
    quick = write_definition(
        tmp_path, [step("One", "record_async"), step("Two", "record_async")], workflow_type="Quick"
    )
    return WorkflowBuilder(definitions=[PAYMENT_DIR, quick])


async def test_it_loads_each_instance_as_load_instance_does(
    builder: WorkflowBuilder, tmp_path: Path
) -> None:
    db = tmp_path / "edgesaga.db"
    async with SQLiteStore(db) as store:
        quick = await builder.create_workflow("Quick", {}, store=store)
        assert await quick.run() is WorkflowStatus.COMPLETED
        waiting = await builder.create_workflow("PaymentProcessing", PAYMENT_DATA, store=store)
        ids = [quick.id, waiting.id]
    # A store opened afresh on the file: what it reads is what was committed.
    async with SQLiteStore(db) as store:
        records = await store.load_instances([*ids, "no-such-workflow", quick.id])
        assert set(records) == set(ids)  # the unknown id left out, the repeated one once
        for wid in ids:
            one = await store.load_instance(wid)
            assert records[wid] == one
            assert records[wid].definition is not None  # with its definition snapshot
        assert records[quick.id].status is WorkflowStatus.COMPLETED
        assert records[waiting.id].workflow_type == "PaymentProcessing"


async def test_it_reads_many_with_one_query(builder: WorkflowBuilder, tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "edgesaga.db") as store:
        made = [await builder.create_workflow("Quick", {}, store=store) for _ in range(40)]
        calls: list[Any] = []
        query = store.query

        async def counted(fn: Any) -> Any:
            calls.append(fn)
            return await query(fn)

        store.query = counted  # type: ignore[method-assign]
        records = await store.load_instances(wf.id for wf in made)
        assert len(calls) == 1
        assert sorted(records) == sorted(wf.id for wf in made)


async def test_it_is_bounded(tmp_path: Path) -> None:
    async with SQLiteStore(tmp_path / "edgesaga.db") as store:
        limit = SQLiteStore.LOAD_INSTANCES_MAX
        assert await store.load_instances([]) == {}
        assert await store.load_instances(f"w{i}" for i in range(limit)) == {}
        with pytest.raises(ValueError, match=f"At most {limit} instances"):
            await store.load_instances(f"w{i}" for i in range(limit + 1))
        # The timer service's pages fit in one call.
        assert limit >= FIRE_PAGE


async def test_rebuild_holds_the_one_object_and_release_lets_it_go(
    builder: WorkflowBuilder, tmp_path: Path
) -> None:
    async with SQLiteStore(tmp_path / "edgesaga.db") as store:
        wid = (await builder.create_workflow("PaymentProcessing", PAYMENT_DATA, store=store)).id
        rec = (await store.load_instances([wid]))[wid]
        fresh = WorkflowBuilder(definitions=[PAYMENT_DIR])
        assert fresh.live(wid) is None
        wf = fresh.rebuild(rec, store)
        assert fresh.live(wid) is wf
        assert (wf.id, wf.status, wf.store) == (wid, rec.status, store)
        assert await fresh.load_workflow(wid, store) is wf  # a command gets the same object
        other = fresh.rebuild(rec, store)  # a second rebuild takes its place
        assert fresh.live(wid) is other
        fresh.release(wf)  # no longer the one held: nothing changes
        assert fresh.live(wid) is other
        fresh.release(other)
        assert fresh.live(wid) is None


async def test_known_plan_of_a_loaded_and_an_unknown_definition(
    builder: WorkflowBuilder, tmp_path: Path
) -> None:
    async with SQLiteStore(tmp_path / "edgesaga.db") as store:
        wf = await builder.create_workflow("PaymentProcessing", PAYMENT_DATA, store=store)
        rec = await store.load_instance(wf.id)
    assert rec is not None
    known = builder.known_plan(rec.definition_hash)
    assert known is not None
    definition, plan = known
    assert definition.workflow_type == "PaymentProcessing"
    assert builder.known_plan(rec.definition_hash)[1] is plan  # type: ignore[index]
    assert builder.known_plan("0" * 64) is None
