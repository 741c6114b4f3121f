"""Every YAML file edgesaga reads (workflow definitions, the agent config, devices files) is bounded:
size, values after alias expansion and nesting depth, and a key given twice in one mapping is
refused naming both lines (issue 10, #6 and #7)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from _engine_fixtures import MODEL, PAYMENT_YAML, ROOT, STEPS

from agent import DefinitionError, load_definition
from agent._config import ConfigError, load_config
from agent._definition import YamlLimits
from hardware import ConfigError as HardwareConfigError
from hardware import load_board_config

HEADER = f"""\
workflow_type: Bomb
workflow_version: "1"
initial_state_model: {MODEL}
steps:
  - name: One
    function: {STEPS}.record
"""

# The classic "billion laughs": nine levels of nine aliases each, 9**9 (387 million) strings once
# expanded, in 700 bytes of text.
BOMB_LEVELS = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{chr(ord('a') + i)}: &{chr(ord('a') + i)} [{','.join(['*' + chr(ord('a') + i - 1)] * 9)}]\n"
    for i in range(1, 9)
)


def bomb_definition() -> str:
    nested = "".join("      " + line + "\n" for line in BOMB_LEVELS.splitlines())
    return HEADER + "    params:\n" + nested


def write(directory: Path, text: str, name: str = "wf.yaml") -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


# -- finding 6: bounded size, node count and depth ------------------------------------------------


def test_an_alias_bomb_in_params_is_refused_quickly(tmp_path: Path) -> None:
    path = write(tmp_path, bomb_definition())
    with pytest.raises(DefinitionError) as info:
        load_definition(path)
    message = str(info.value)
    assert message.startswith(f"{path}:")
    assert "more than 100000 values once its aliases are expanded" in message
    assert "\n" not in message


def test_a_file_larger_than_the_limit_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    filler = "# " + "x" * 1000 + "\n"
    path = write(tmp_path, HEADER + filler * 1100)  # about 1.1 MB of comments
    with pytest.raises(DefinitionError, match=r"larger than 1048576 bytes") as info:
        load_definition(path)
    assert info.value.path == str(path)


def test_nesting_deeper_than_the_limit_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + "    params: {deep: " + "[" * 70 + "]" * 70 + "}\n")
    with pytest.raises(DefinitionError, match="nested more than 64 levels deep"):
        load_definition(path)


def test_a_self_referencing_alias_is_refused_not_followed_forever(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + "    params: {loop: &loop [*loop]}\n")
    with pytest.raises(DefinitionError, match="nested more than 64 levels deep"):
        load_definition(path)


def test_the_limits_are_configurable(tmp_path: Path) -> None:
    tight = YamlLimits(max_bytes=100_000, max_nodes=40, max_depth=5)
    with pytest.raises(DefinitionError, match="more than 40 values"):
        load_definition(PAYMENT_YAML, limits=tight)
    roomy = YamlLimits(max_nodes=10**9)
    path = write(tmp_path, HEADER + "    params: {lots: [" + ",".join(["1"] * 150_000) + "]}\n")
    with pytest.raises(DefinitionError, match="more than 100000 values"):
        load_definition(path)
    assert len(load_definition(path, limits=roomy).steps[0].spec.params["lots"]) == 150_000


def test_the_agent_config_carries_the_limits(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, "yaml_limits: {max_bytes: 2048, max_nodes: 500, max_depth: 8}\n", "a.yaml"),
        environ={},
    )
    assert cfg.yaml_limits == YamlLimits(max_bytes=2048, max_nodes=500, max_depth=8)
    assert load_config(None, environ={}).yaml_limits == YamlLimits()
    assert (YamlLimits().max_bytes, YamlLimits().max_nodes, YamlLimits().max_depth) == (
        1024 * 1024,
        100_000,
        64,
    )
    with pytest.raises(ConfigError, match=r"yaml_limits\.max_nodes"):
        load_config(write(tmp_path, "yaml_limits: {max_nodes: 0}\n", "b.yaml"), environ={})


def test_an_alias_bomb_in_the_agent_config_is_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "device_id: pi\nmqtt:\n  junk:\n"
        + "".join("    " + line + "\n" for line in BOMB_LEVELS.splitlines()),
        "agent.yaml",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(info.value).startswith(f"{path}:")
    assert "more than 100000 values once its aliases are expanded" in str(info.value)


def test_an_oversized_agent_config_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "device_id: pi\n" + ("#" * 1000 + "\n") * 1100, "agent.yaml")
    with pytest.raises(ConfigError, match=r"larger than 1048576 bytes"):
        load_config(path, environ={})


def test_an_alias_bomb_in_a_devices_file_is_refused(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "devices: {}\nsimulate_notes:\n"
        + "".join("  " + line + "\n" for line in BOMB_LEVELS.splitlines()),
        "devices.yaml",
    )
    with pytest.raises(HardwareConfigError) as info:
        load_board_config(path)
    assert str(info.value).startswith(f"{path}:")
    assert "more than 100000 values once its aliases are expanded" in str(info.value)


@pytest.mark.slow
def test_validate_refuses_an_alias_bomb_in_its_own_process(tmp_path: Path) -> None:
    """The command a user runs: a one-line error and exit status 2 within seconds, not 2 GB."""
    path = write(tmp_path, bomb_definition())
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "validate", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert proc.returncode == 2, proc.stderr
    [bad] = proc.stderr.splitlines()
    assert bad.startswith(f"edgesaga: error: {path}:")
    assert "more than 100000 values once its aliases are expanded" in bad


# -- finding 7: a key given twice -----------------------------------------------------------------


def test_a_duplicate_top_level_key_names_both_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "workflow_type: A\n" + HEADER.replace("workflow_type: Bomb\n", ""))
    text = path.read_text().replace("initial_state_model", "workflow_type: B\ninitial_state_model")
    path.write_text(text)
    lines = text.splitlines()
    second = lines.index("workflow_type: B") + 1
    with pytest.raises(DefinitionError) as info:
        load_definition(path)
    err = info.value
    assert err.line == second
    assert err.key == "workflow_type"
    assert f"lines 1 and {second}" in str(err)
    assert "given twice" in str(err)


def test_a_duplicate_key_inside_a_step_names_both_lines(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        HEADER + f"    function: {STEPS}.fail\n",  # lines 6 and 7
    )
    with pytest.raises(
        DefinitionError, match="'function' is given twice, on lines 6 and 7"
    ) as info:
        load_definition(path)
    assert info.value.line == 7


def test_a_merge_key_may_override_what_it_merges(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        HEADER
        + "    retry: &retry {max_attempts: 2, initial_delay: 0}\n"
        + f"  - name: Two\n    function: {STEPS}.record\n"
        + "    retry: {<<: *retry, max_attempts: 3}\n",
    )
    definition = load_definition(path)
    assert [s.spec.retry.max_attempts for s in definition.steps] == [2, 3]
    assert definition.steps[1].spec.retry.initial_delay == 0


def test_a_duplicate_key_in_the_agent_config_names_both_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "device_id: a\nmax_concurrent: 2\ndevice_id: b\n", "agent.yaml")
    with pytest.raises(ConfigError, match=r"'device_id' is given twice, on lines 1 and 3") as info:
        load_config(path, environ={})
    assert str(info.value).startswith(f"{path}:3:")


def test_a_duplicate_device_in_a_devices_file_names_both_lines(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "devices:\n  pump: {kind: output, pin: 17}\n  pump: {kind: output, pin: 27}\n",
        "devices.yaml",
    )
    with pytest.raises(HardwareConfigError, match=r"'pump' is given twice, on lines 2 and 3"):
        load_board_config(path)


def test_a_control_character_is_one_sentence_with_its_line(tmp_path: Path) -> None:
    """Found by tests/test_fuzz_yaml.py: PyYAML's reader error spans two lines and has no mark."""
    path = write(tmp_path, HEADER + "    description: a\x08b\n")
    with pytest.raises(DefinitionError) as info:
        load_definition(path)
    assert info.value.line == 7
    assert "\n" not in str(info.value)
    assert "a character it does not allow (#x0008" in str(info.value)
    cfg = write(tmp_path, "device_id: pi\x07\n", "agent.yaml")
    with pytest.raises(ConfigError, match=rf"^{cfg}:1: the YAML holds a character") as err:
        load_config(cfg, environ={})
    assert "\n" not in str(err.value)
