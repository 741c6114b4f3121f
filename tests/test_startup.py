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


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_resume_frees_start_up_cycles_freezes_the_survivors_and_turns_the_collector_on(
    collector: None,
) -> None:
    _startup.pause_gc()
    assert not gc.isenabled()
    gone = weakref.ref(_Node())
    assert gone() is not None  # nothing collects while paused

    _startup.resume_gc()

    assert gc.isenabled()
    assert gone() is None  # start-up's garbage is collected, not frozen with the rest
    assert gc.get_freeze_count() > 0


def test_resume_leaves_a_collector_it_did_not_pause_alone(collector: None) -> None:
    gc.disable()  # as an embedding program might
    _startup.pause_gc()
    _startup.resume_gc()
    assert not gc.isenabled()
    assert gc.get_freeze_count() == 0


def test_a_one_shot_command_runs_with_the_collector_on_and_nothing_frozen(
    collector: None, capsys: pytest.CaptureFixture[str]
) -> None:
    _startup.pause_gc()
    payment = Path(__file__).resolve().parents[1] / "workflows" / "payment" / "payment.yaml"
    assert cli(["validate", str(payment)]) == 0
    assert gc.isenabled()
    assert gc.get_freeze_count() == 0
    assert "PaymentProcessing" in capsys.readouterr().out


async def test_the_agent_turns_the_collector_on_once_it_is_ready(
    collector: None, tmp_path: Path
) -> None:
    _startup.pause_gc()  # what the edgesaga command does first
    async with running(_config(tmp_path, retention={})) as agent:
        assert agent.builder is not None
        assert gc.isenabled()
        assert gc.get_freeze_count() > 0
