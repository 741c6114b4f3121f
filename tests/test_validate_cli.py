"""``edgesaga validate``: every bad file is reported (one line each), what fails at run time today is
caught here with the agent config, and the summary counts workflows and steps in good English."""

from __future__ import annotations

from pathlib import Path

import pytest
from _engine_fixtures import PAYMENT_YAML, step, write_definition

from agent._cli import main


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- finding 15: --log-level and the step count --------------------------------------------------


@pytest.mark.parametrize("level", ["bogus", "verbose", ""])
def test_an_unknown_log_level_is_refused_in_one_sentence(
    capsys: pytest.CaptureFixture[str], level: str
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--log-level", level, "validate", str(PAYMENT_YAML)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"{level!r}" in err
    assert "DEBUG, INFO, WARNING, ERROR" in err
    assert "Traceback" not in err


def test_a_known_log_level_is_accepted_in_any_case(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "--log-level", "debug", "validate", str(PAYMENT_YAML))
    assert code == 0
    assert "PaymentProcessing" in out


def test_an_unknown_log_level_from_the_environment_is_refused(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGESAGA_LOG_LEVEL", "loud")
    with pytest.raises(SystemExit) as info:
        main(["validate", str(PAYMENT_YAML)])
    assert info.value.code == 2
    assert "'loud'" in capsys.readouterr().err


def test_one_step_is_one_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_definition(tmp_path, [step("Only", "record")], workflow_type="Single")
    code, out, _ = run_cli(capsys, "validate", str(path))
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"ok  {path}: Single 1.0.0, 1 step, hash ")
    assert lines[-1] == "1 workflow, 1 step"


def test_the_summary_counts_workflows_and_steps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_definition(tmp_path, [step("A", "record"), step("B", "record")], workflow_type="Two")
    write_definition(tmp_path, [step("A", "record")], workflow_type="One")
    code, out, _ = run_cli(capsys, "validate", str(tmp_path))
    assert code == 0
    assert ", 2 steps, hash " in out
    assert out.splitlines()[-1] == "2 workflows, 3 steps"
