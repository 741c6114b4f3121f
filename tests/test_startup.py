"""The cyclic garbage collector is off during start-up and on again once the agent is ready
(``agent/_startup.py``): after READY for ``edgesaga run``, before the command for the others."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import _startup
from agent._cli import main as cli
from tests.test_retention import _config, running


@pytest.fixture
def collector() -> Iterator[None]:
    """Put the collector back as the test found it, whatever the test did to it."""
    was_enabled = gc.isenabled()
    yield
    _startup._paused = False
    gc.unfreeze()
    if was_enabled:
        gc.enable()
    else:
        gc.disable()


class _Made:
    """An object the collector tracks (instances of plain classes are)."""


def _cycle() -> weakref.ref[_Made]:
    """Garbage only the cyclic collector frees; the returned reference dies when it does."""
    made = _Made()
    made.me = made  # type: ignore[attr-defined]
    return weakref.ref(made)


def _watched(obj: object) -> bool:
    """Whether collections still walk ``obj`` (frozen objects are out of their sight)."""
    return any(o is obj for o in gc.get_objects())


def test_resume_freezes_what_start_up_made_and_turns_the_collector_on(collector: None) -> None:
    _startup.pause_gc()
    assert not gc.isenabled()
    made = _Made()
    assert _watched(made)

    _startup.resume_gc(collect=False)

    assert gc.isenabled()
    assert not _watched(made)
    assert _watched(_Made())  # what comes after start-up is collected as usual


def test_resume_with_collect_frees_start_up_garbage_before_freezing(collector: None) -> None:
    _startup.pause_gc()
    garbage = _cycle()
    kept = _Made()
    assert garbage() is not None  # nothing collects while paused

    _startup.resume_gc(collect=True)

    assert garbage() is None
    assert gc.isenabled()
    assert not _watched(kept)


def test_resume_leaves_a_collector_it_did_not_pause_alone(collector: None) -> None:
    gc.disable()  # as an embedding program might
    _startup.pause_gc()
    _startup.resume_gc(collect=True)
    assert not gc.isenabled()
    assert gc.get_freeze_count() == 0


def test_a_one_shot_command_runs_with_the_collector_on(
    collector: None, capsys: pytest.CaptureFixture[str]
) -> None:
    _startup.pause_gc()
    payment = Path(__file__).resolve().parents[1] / "workflows" / "payment" / "payment.yaml"
    assert cli(["validate", str(payment)]) == 0
    assert gc.isenabled()
    assert gc.get_freeze_count() > 0
    assert "PaymentProcessing" in capsys.readouterr().out


async def test_the_agent_collects_start_up_garbage_and_turns_the_collector_on_once_ready(
    collector: None, tmp_path: Path
) -> None:
    _startup.pause_gc()  # what the edgesaga command does first
    garbage = _cycle()
    async with running(_config(tmp_path, retention={})) as agent:
        assert agent.builder is not None
        assert gc.isenabled()
        assert garbage() is None
        assert gc.get_freeze_count() > 0
