"""Workflow ids and event timestamps, which the engine makes with its own fast paths."""

from __future__ import annotations

import os
import uuid
import warnings
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from agent._engine import new_workflow_id
from agent._store import iso


@given(st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False))
def test_iso_matches_datetime(ts: float) -> None:
    expected = datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"
    assert iso(ts) == expected


def test_iso_of_none_is_none() -> None:
    assert iso(None) is None


def test_workflow_ids_are_unique_version_4_uuids() -> None:
    ids = [new_workflow_id() for _ in range(2000)]  # several refills of the random pool
    assert len(set(ids)) == len(ids)
    assert {uuid.UUID(i).version for i in ids} == {4}


def test_forked_child_does_not_repeat_the_parents_ids() -> None:
    new_workflow_id()  # the pool now holds ids a careless fork would copy
    read, write = os.pipe()
    with warnings.catch_warnings():  # 3.12+ warns about forking with threads; the child only writes
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        os.write(write, new_workflow_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert child != new_workflow_id()
    assert uuid.UUID(child).version == 4
