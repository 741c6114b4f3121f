"""``edgesaga validate``: every bad file is reported (one line each), what fails at run time today is
caught here with the agent config, and the summary counts workflows and steps in good English."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _engine_fixtures import DEFS_DIR, MODEL, PAYMENT_YAML, ROOT, step, write_definition

from agent import DefinitionError
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


ERROR = "edgesaga: error: "


def bad_lines(err: str) -> list[str]:
    """The problems validate printed (on stderr), without the prefix."""
    lines = err.splitlines()
    assert all(line.startswith(ERROR) for line in lines), err  # one line per problem, no more
    return [line.removeprefix(ERROR) for line in lines]


# -- finding 16: what makes `edgesaga run` refuse is caught, and every bad file is reported -------


def test_two_files_defining_one_type_are_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = write_definition(
        tmp_path, [step("A", "record")], workflow_type="Twice", filename="a.yaml"
    )
    second = write_definition(
        tmp_path, [step("B", "record")], workflow_type="Twice", filename="b.yaml"
    )
    code, out, err = run_cli(capsys, "validate", str(tmp_path))
    assert code == 2
    assert bad_lines(err) == [
        f"{second}: workflow type 'Twice' is also defined in {first}; each type must be "
        "defined once."
    ]
    assert out.splitlines()[-1] == "1 workflow, 1 step; 1 problem in 1 file"


def test_redefining_a_bundled_type_is_reported(tmp_path: Path) -> None:
    """Run as the user runs it: in-process under pytest, ``workflows`` is tests/flows."""
    path = write_definition(tmp_path, [step("A", "record")], workflow_type="PaymentProcessing")
    proc = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "edgesaga"), "validate", str(path)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},  # the test step module
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert proc.returncode == 2, proc.stderr
    assert bad_lines(proc.stderr) == [
        f"{path}: workflow type 'PaymentProcessing' is also defined in {PAYMENT_YAML}; "
        "each type must be defined once."
    ]


def test_the_agent_refuses_what_validate_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The agent's loader and validate find the same problem, so they cannot disagree."""
    from agent._config import load_config
    from agent._validate import load_definitions

    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        write_definition(tmp_path / name, [step(name, "record")], workflow_type="Clash")
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("include_bundled: false\ndefinitions: [one, two]\n")
    with pytest.raises(DefinitionError) as info:
        load_definitions(load_config(cfg, environ={}))
    code, _, err = run_cli(capsys, "validate", "--config", str(cfg))
    assert code == 2
    assert bad_lines(err) == [str(info.value)]
    assert f"{tmp_path / 'two' / 'Clash.yaml'}: workflow type 'Clash' is also defined in" in err


def test_every_bad_file_is_reported_not_just_the_first(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run_cli(capsys, "validate", str(DEFS_DIR))
    assert code == 2
    files = sorted(p for p in DEFS_DIR.glob("*.yaml") if "workflow_type:" in p.read_text())
    reported = [line.split()[0].split(":")[0].rstrip(",") for line in bad_lines(err)]
    assert reported == [str(p) for p in files]  # one line each, in file order
    assert (
        out.splitlines()[-1] == f"0 workflows, 0 steps; {len(files)} problems in {len(files)} files"
    )


def test_good_and_bad_files_together(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_definition(tmp_path, [step("A", "record"), step("B", "record")], workflow_type="Good")
    (tmp_path / "broken.yaml").write_text("workflow_type: Broken\nsteps: [\n")
    missing = tmp_path / "nowhere.yaml"
    code, out, err = run_cli(capsys, "validate", str(tmp_path), str(missing))
    assert code == 2
    assert [line.split()[0] for line in out.splitlines()] == ["ok", "1"]
    assert len(bad_lines(err)) == 2
    assert f"{missing}: no such file or directory" in err
    assert out.splitlines()[-1] == "1 workflow, 2 steps; 2 problems in 2 files"


# -- finding 17: with the agent config, what used to fail only at run time ------------------------

AGENT_YAML = """\
include_bundled: false
hardware:
  pin_factory: mock
  devices:
    valve: {kind: output, pin: 17}
    level: {kind: input, pin: 22, pull_up: true}
    fan: {kind: pwm, pin: 18}
"""

HW_HEADER = """\
workflow_type: Hw
workflow_version: "1"
initial_state_model: hardware.HardwareState
"""


def validate_with_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str, config: str = AGENT_YAML
) -> tuple[int, list[str], Path]:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(config)
    path = tmp_path / "wf" / "hw.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(HW_HEADER + body)
    code, _, err = run_cli(capsys, "validate", "--config", str(cfg), str(path))
    assert "Traceback" not in err
    return code, bad_lines(err), path


def test_unknown_resources_and_devices_are_named_with_their_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = """\
resources: [valve, heater]
steps:
  - name: Open
    function: hardware.steps.set_output
    compensate_function: hardware.steps.restore_output
    params: {device: vlave, value: true}
  - name: Fan
    function: hardware.steps.set_pwm
    params: {device: fan, value: 0.5}
"""
    code, bad, path = validate_with_config(tmp_path, capsys, body)
    assert code == 2
    known = "known devices: 'valve', 'level', 'fan'"
    assert bad == [
        f"{path}:4, key 'resources': resources names 'heater', which is not a device in the "
        f"agent config's hardware section ({known}); add the device or fix the name.",
        f"{path}:9, step 'Open', key 'device': device 'vlave' is not in the agent config's "
        f"hardware section ({known}); add it or fix the name.",
    ]


def test_a_step_given_a_device_of_the_wrong_kind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = """\
steps:
  - name: Open
    function: hardware.steps.set_output
    params: {device: level, value: true}
  - name: Dim
    function: hardware.steps.set_pwm
    params: {device: valve, value: 0.5}
  - name: Wait
    function: hardware.steps.wait_for_input
    params: {device: fan}
"""
    code, bad, path = validate_with_config(tmp_path, capsys, body)
    assert code == 2
    assert [line.split(": ", 1)[0] for line in bad] == [
        f"{path}:7, step 'Open', key 'device'",
        f"{path}:10, step 'Dim', key 'device'",
        f"{path}:13, step 'Wait', key 'device'",
    ]
    assert "needs an output or pwm device, but 'level' is an input device" in bad[0]
    assert "needs a pwm device, but 'valve' is an output device" in bad[1]
    assert "needs an input or button device, but 'fan' is a pwm device" in bad[2]


def test_gpio_steps_with_a_config_that_has_no_hardware(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = """\
steps:
  - name: Open
    function: hardware.steps.set_output
    params: {device: valve, value: true}
"""
    code, bad, path = validate_with_config(tmp_path, capsys, body, "include_bundled: false\n")
    assert code == 2
    assert bad == [
        f"{path}:6, step 'Open', key 'function': hardware.steps.set_output drives GPIO, but "
        "the agent config has no hardware section; add one with the devices (use `pin_factory: "
        "mock` on a desktop)."
    ]


def test_state_fields_are_checked_without_a_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "hw.yaml"
    path.write_text(
        HW_HEADER
        + """\
steps:
  - name: Wait
    function: hardware.steps.wait_for_input
    params: {device: level, timeout: 3, field: level_reached}
"""
    )
    gpio = tmp_path / "gpio.yaml"
    gpio.write_text(
        f"""\
workflow_type: NoGpio
workflow_version: "1"
initial_state_model: {MODEL}
steps:
  - name: Pump
    function: hardware.steps.run_for
    params: {{device: pump, seconds: 2}}
"""
    )
    code, _, err = run_cli(capsys, "validate", str(path), str(gpio))
    assert code == 2
    bad = bad_lines(err)
    assert bad[0].startswith(f"{path}:7, step 'Wait', key 'field': field names the state ")
    assert len(bad) == 1  # a GPIO step needs no gpio field: the journal keeps what it commanded


def test_a_definition_that_fits_the_config_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = """\
resources: [valve, level]
steps:
  - name: Open
    function: hardware.steps.set_output
    compensate_function: hardware.steps.restore_output
    params: {device: valve, value: true}
  - name: Wait
    function: hardware.steps.wait_for_input
    params: {device: level, timeout: 3}
"""
    code, bad, _ = validate_with_config(tmp_path, capsys, body)
    assert (code, bad) == (0, [])


# -- finding 19: custom step modules beside the YAML, or in python_path ---------------------------

FISH_STEPS = """\
def feed(state, context, grams):
    return None
"""


def fish_definition(directory: Path, module: str) -> Path:
    path = directory / "fish.yaml"
    path.write_text(
        f"""\
workflow_type: Fish
workflow_version: "1"
initial_state_model: {MODEL}
steps:
  - name: Feed
    function: {module}.feed
    params: {{grams: 5}}
"""
    )
    return path


def edgesaga(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The installed command, from a directory that is not the repository (no PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "EDGESAGA_CONFIG")}
    env["PYTHONPATH"] = str(ROOT)  # only for the test state model
    return subprocess.run(
        [str(ROOT / ".venv" / "bin" / "edgesaga"), *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=20,
    )


def test_a_step_module_beside_the_definitions_imports(tmp_path: Path) -> None:
    defs = tmp_path / "workflows"
    (defs / "fish").mkdir(parents=True)
    (defs / "fishsteps.py").write_text(FISH_STEPS)
    path = fish_definition(defs / "fish", "fishsteps")
    (tmp_path / "agent.yaml").write_text("include_bundled: false\ndefinitions: [workflows]\n")
    # validate DIR: the directory it was given is importable, as the agent's definitions are
    proc = edgesaga("validate", str(defs), cwd=tmp_path / "workflows" / "fish")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[0].startswith(f"ok  {path}: Fish 1, 1 step, hash ")
    # --config: the config's definitions directories are its default python_path
    proc = edgesaga("validate", "--config", "agent.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1] == "1 workflow, 1 step"


def test_python_path_in_the_config(tmp_path: Path) -> None:
    (tmp_path / "defs").mkdir()
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "fishlib.py").write_text(FISH_STEPS)
    fish_definition(tmp_path / "defs", "fishlib")
    config = "include_bundled: false\ndefinitions: [defs]\n"
    (tmp_path / "without.yaml").write_text(config)
    (tmp_path / "with.yaml").write_text(config + "python_path: [lib]\n")
    proc = edgesaga("validate", "--config", "without.yaml", cwd=tmp_path)
    assert proc.returncode == 2
    assert "No module named 'fishlib'" in proc.stderr
    assert "in a python_path directory of the agent config" in proc.stderr
    proc = edgesaga("validate", "--config", "with.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_agent_loader_honours_python_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agent._config import load_config
    from agent._validate import load_definitions

    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "defs").mkdir()
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "fishlib_agent.py").write_text(FISH_STEPS)
    fish_definition(tmp_path / "defs", "fishlib_agent")
    cfg_path = tmp_path / "agent.yaml"
    cfg_path.write_text("include_bundled: false\ndefinitions: [defs]\npython_path: [lib]\n")
    cfg = load_config(cfg_path, environ={})
    assert cfg.python_path == [tmp_path / "lib"]
    try:
        [definition] = load_definitions(cfg)
    finally:
        sys.modules.pop("fishlib_agent", None)
    assert definition.workflow_type == "Fish"
    assert sys.path[-1] == str(tmp_path / "lib")  # appended: it cannot shadow installed packages


def test_the_agent_loads_a_mismatch_with_a_warning_that_validate_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A device typo fails only the workflow that uses it: the agent starts (and says so in its
    log); validate, run before a restart, refuses it."""
    from agent._config import load_config
    from agent._validate import load_definitions

    body = """\
steps:
  - name: Open
    function: hardware.steps.set_output
    params: {device: vlave, value: true}
"""
    code, bad, path = validate_with_config(tmp_path, capsys, body)
    assert code == 2
    cfg = load_config(tmp_path / "agent.yaml", environ={}).model_copy(
        update={"definitions": [path]}
    )
    with caplog.at_level("WARNING", logger="edgesaga.definitions"):
        [definition] = load_definitions(cfg)
    assert definition.workflow_type == "Hw"
    assert [r.getMessage() for r in caplog.records] == [
        f"{bad[0].removeprefix('bad ')} (edgesaga validate --config lists every such problem)"
    ]


@pytest.mark.slow
def test_the_agent_runs_a_step_module_kept_beside_its_definitions(tmp_path: Path) -> None:
    """`edgesaga run` with no PYTHONPATH: the definitions directory is importable (#19)."""
    from agent._socket import request

    defs = tmp_path / "workflows"
    defs.mkdir()
    (defs / "fishsteps_run.py").write_text(FISH_STEPS)
    fish_definition(defs, "fishsteps_run")
    sock = tmp_path / "control.sock"
    (tmp_path / "agent.yaml").write_text(
        f"include_bundled: false\ndefinitions: [workflows]\ndatabase: db/edgesaga.db\n"
        f"control_socket: {sock}\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "EDGESAGA_CONFIG")}
    env["PYTHONPATH"] = str(ROOT)  # only for the test state model
    env.pop("NOTIFY_SOCKET", None)
    log = tmp_path / "agent.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(ROOT / ".venv" / "bin" / "edgesaga"), "run", "--config", "agent.yaml"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def ask(command: str, **fields: object) -> dict[str, object] | None:
            try:
                return request(sock, command, timeout=5, **fields)
            except OSError:
                return None

        deadline = time.monotonic() + 15
        while ask("status") is None:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the agent's socket never answered"
            time.sleep(0.05)
        reply = ask("start", request_id="f1", workflow_type="Fish")
        assert reply is not None
        assert reply["ok"], reply
        while True:
            got = ask("get", request_id="g", workflow_id=reply["workflow_id"])
            if got and got.get("status") == "COMPLETED":
                break
            assert time.monotonic() < deadline, got
            time.sleep(0.05)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()


def test_validate_with_only_a_config_checks_what_the_agent_would_load(tmp_path: Path) -> None:
    (tmp_path / "agent.yaml").write_text("device_id: pi\n")
    proc = edgesaga("validate", "--config", "agent.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split(": ")[1].split(",")[0] for line in lines[:-1]] == [
        "DailyIrrigation 1.0.0",
        "Irrigation 1.0.0",
        "SoilIrrigation 1.0.0",
        "TwoBeds 1.0.0",
        "PaymentProcessing 1.0.0",
        "PaymentWithApproval 1.0.0",
    ]
    assert lines[-1] == "6 workflows, 30 steps"
    proc = edgesaga("validate", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == (
        "edgesaga: error: Name the workflow definition files or directories to check, or give "
        "--config to check the ones the agent would load.\n"
    )


def test_the_cli_without_an_agent_loads_as_the_agent_does(tmp_path: Path) -> None:
    """`edgesaga start --config` with no agent running: python_path and max_state_bytes of the
    config apply, as they do in `edgesaga run`."""
    (tmp_path / "defs").mkdir()
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "fishlib_cli.py").write_text(
        FISH_STEPS + "\n\ndef big(state, context):\n    return {'note': 'x' * 5000}\n"
    )
    fish_definition(tmp_path / "defs", "fishlib_cli")
    (tmp_path / "defs" / "big.yaml").write_text(
        f"""\
workflow_type: Big
workflow_version: "1"
initial_state_model: {MODEL}
steps:
  - name: Grow
    function: fishlib_cli.big
"""
    )
    (tmp_path / "agent.yaml").write_text(
        "include_bundled: false\ndefinitions: [defs]\npython_path: [lib]\n"
        f"database: {tmp_path / 'db' / 'e.db'}\ncontrol_socket: {tmp_path / 'none.sock'}\n"
        "max_state_bytes: 2000\n"
    )
    proc = edgesaga("start", "Fish", "--config", "agent.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = edgesaga("start", "Big", "--id", "big-1", "--config", "agent.yaml", cwd=tmp_path)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    info = json.loads(edgesaga("get", "big-1", "--config", "agent.yaml", cwd=tmp_path).stdout)
    assert info["status"] == "FAILED", info
    assert "max_state_bytes" in info["error"]


def test_the_run_fast_path_refuses_a_bad_log_level_from_the_environment(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "EDGESAGA_CONFIG"}
    env["EDGESAGA_LOG_LEVEL"] = "bogus"
    proc = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "edgesaga"), "run", "--config", "missing.yaml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert proc.returncode == 2
    assert "unknown log level 'bogus'" in proc.stderr
    assert not (tmp_path / "missing.yaml").exists()
