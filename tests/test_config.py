"""The agent config (``agent.yaml``): defaults, strict keys, paths, environment overrides, errors."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import yaml

from agent._config import AgentConfig, ConfigError, load_config
from agent._mqtt import MqttSettings
from tests.flows.service.harness import agent_process, cli

ROOT = Path(__file__).resolve().parent.parent


def _write(directory: Path, text: str, name: str = "agent.yaml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, environ={})
    assert cfg.device_id == (socket.gethostname().split(".")[0] or "edgesaga")
    assert cfg.database == tmp_path / ".edgesaga" / "edgesaga.db"
    assert cfg.socket_path == tmp_path / ".edgesaga" / "control.sock"
    assert cfg.control_socket is None
    assert cfg.definitions == []
    assert cfg.include_bundled is True
    assert cfg.max_concurrent == 4
    assert cfg.grace_period == 10.0
    assert (cfg.retention.max_age_days, cfg.retention.max_finished, cfg.retention.interval) == (
        30.0,
        1000,
        3600.0,
    )
    assert (cfg.logging.level, cfg.logging.format) == ("INFO", "text")
    assert cfg.hardware is None
    # Without an mqtt section the agent runs offline; the other MQTT keys keep their defaults.
    assert cfg.mqtt.enabled is False
    assert cfg.mqtt.model_copy(update={"enabled": True}) == MqttSettings()
    m = cfg.mqtt
    assert (m.host, m.port, m.version, m.topic_prefix, m.keepalive) == (
        "localhost",
        1883,
        "5",
        "edgesaga",
        30,
    )
    assert (m.max_payload, m.outbox_cap, m.session_expiry) == (65536, 100_000, 7 * 24 * 3600)
    # An empty file means the same defaults.
    assert load_config(_write(tmp_path, ""), environ={}) == cfg


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("max_concurent: 3\n", "max_concurent"),
        ("mqtt: {hots: broker}\n", "mqtt.hots"),
        ("retention: {max_rows: 5}\n", "retention.max_rows"),
        (
            "hardware: {devices: {lamp: {kind: output, pin: 17, colour: red}}}\n",
            "hardware.devices.lamp.colour",
        ),
    ],
)
def test_unknown_key_is_rejected_naming_it(tmp_path: Path, text: str, key: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    message = str(err.value)
    assert message.startswith(f"{path}: {key}:"), message
    assert "unknown key" in message


def test_invalid_value_names_file_and_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "max_concurrent: 0\n")
    with pytest.raises(
        ConfigError, match=r"agent\.yaml: max_concurrent: .*greater than or equal to 1"
    ):
        load_config(path, environ={})


def test_relative_paths_are_resolved_against_the_config_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = _write(
        conf_dir,
        "database: data/agent.db\n"
        "definitions: [flows, /abs/flows]\n"
        "control_socket: run/ctl.sock\n"
        "mqtt: {enabled: false, password_file: secret, tls: {ca_file: ca.pem, cert_file: c.pem, key_file: c.key}}\n",
    )
    cfg = load_config(Path(os.path.relpath(path)), environ={})  # a relative path to the file, too
    assert cfg.database == conf_dir / "data" / "agent.db"
    assert cfg.definitions == [conf_dir / "flows", Path("/abs/flows")]
    assert cfg.control_socket == conf_dir / "run" / "ctl.sock"
    assert cfg.socket_path == conf_dir / "run" / "ctl.sock"
    assert cfg.mqtt.password_file == conf_dir / "secret"
    assert cfg.mqtt.tls is not None
    assert (cfg.mqtt.tls.ca_file, cfg.mqtt.tls.cert_file, cfg.mqtt.tls.key_file) == (
        conf_dir / "ca.pem",
        conf_dir / "c.pem",
        conf_dir / "c.key",
    )
    # Without control_socket the socket sits beside the (resolved) database.
    cfg = load_config(_write(conf_dir, "database: db/x.db\n", "b.yaml"), environ={})
    assert cfg.socket_path == conf_dir / "db" / "control.sock"


def test_environment_overrides(tmp_path: Path) -> None:
    path = _write(
        tmp_path, "max_concurrent: 2\nmqtt: {enabled: true, host: from-file, port: 1884}\n"
    )
    env = {
        "EDGESAGA_MAX_CONCURRENT": "8",
        "EDGESAGA_MQTT__HOST": "x",
        "EDGESAGA_RETENTION__MAX_FINISHED": "5",
        "EDGESAGA_LOGGING__LEVEL": "debug",
        # Not config: these belong to other parts of edgesaga and must not be rejected as keys.
        "EDGESAGA_REAL_PINS": "1",
        "EDGESAGA_CONFIG": str(path),
        "EDGESAGA_LOG_LEVEL": "INFO",
        "EDGESAGA_TEST_HOOKS": "1",
        "OTHER_MAX_CONCURRENT": "99",
    }
    cfg = load_config(path, environ=env)
    assert cfg.max_concurrent == 8  # the environment wins over the file
    assert cfg.mqtt.host == "x"
    assert cfg.mqtt.port == 1884  # the rest of the section is kept
    assert cfg.mqtt.enabled is True
    assert cfg.retention.max_finished == 5
    assert cfg.logging.level == "DEBUG"


def test_environment_overrides_from_the_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGESAGA_MAX_CONCURRENT", "8")
    monkeypatch.setenv("EDGESAGA_MQTT__HOST", "x")
    monkeypatch.setenv("EDGESAGA_REAL_PINS", "1")
    cfg = load_config(_write(tmp_path, "mqtt: {enabled: false}\n"))
    assert (cfg.max_concurrent, cfg.mqtt.host, cfg.mqtt.enabled) == (8, "x", False)


def test_environment_values_are_validated_and_unknown_nested_keys_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path, "")
    with pytest.raises(ConfigError, match="max_concurrent"):
        load_config(path, environ={"EDGESAGA_MAX_CONCURRENT": "many"})
    with pytest.raises(ConfigError, match=r"mqtt\.hots: unknown key"):
        load_config(path, environ={"EDGESAGA_MQTT__HOTS": "x"})


def test_environment_string_values_that_look_like_numbers_stay_strings(tmp_path: Path) -> None:
    """A device id or user name made of digits (a serial number, say) is still text. The values
    are parsed as YAML scalars, so ``1234`` arrives as an int; a string key must accept it."""
    cfg = load_config(
        _write(tmp_path, ""),
        environ={"EDGESAGA_DEVICE_ID": "1234", "EDGESAGA_MQTT__USERNAME": "0042"},
    )
    assert cfg.device_id == "1234"
    assert cfg.mqtt.username == "0042"


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("device_id: a\nmqtt:\n\thost: x\n", 3),
        ("device_id: a\nmax_concurrent: 4\n  grace_period: 3\n", 3),
    ],
)
def test_malformed_yaml_names_file_and_line(tmp_path: Path, text: str, line: int) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert str(err.value).startswith(f"{path}:{line}: malformed YAML"), str(err.value)


def test_unreadable_or_non_mapping_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Cannot read the config file"):
        load_config(tmp_path / "missing.yaml", environ={})
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"), environ={})


def test_the_shipped_example_config_loads() -> None:
    example = ROOT / "systemd" / "agent.yaml"
    assert example.exists(), "systemd/agent.yaml (the example config) is missing"
    cfg = load_config(example, environ={})
    assert isinstance(cfg, AgentConfig)
    assert cfg.database.is_absolute()
    assert cfg.hardware is not None
    assert cfg.hardware.devices  # the example shows at least one device
    for device in cfg.hardware.devices.values():
        assert 0 <= device.pin <= 27


def test_the_shipped_example_talks_plain_mqtt_as_its_comments_say() -> None:
    """systemd/agent.yaml says "Set ca_file for TLS" and points at port 1883. A present ``mqtt.tls``
    section turns TLS on (system CAs) even when every file in it is null, so the example must leave
    TLS off, or a fresh install never connects to a plain local Mosquitto."""
    cfg = load_config(ROOT / "systemd" / "agent.yaml", environ={})
    assert cfg.mqtt.port == 1883
    assert cfg.mqtt.tls is None, f"TLS is on in the example: {cfg.mqtt.tls}"


# -- issue 10 #5: the agent opens outputs at their safe value, whatever `initial` says ------------

RELAYS = """\
hardware:
  pin_factory: mock
  devices:
    relay: {kind: output, pin: 17, initial: true, safe: false}
    lamp: {kind: output, pin: 27, active_high: false, initial: false, safe: true}
    fan: {kind: pwm, pin: 18, initial: 1.0, safe: 0.25}
    level: {kind: input, pin: 22, pull_up: true}
"""


def test_the_agent_opens_outputs_at_their_safe_value_not_initial(tmp_path: Path) -> None:
    from agent._service import Agent

    cfg = load_config(_write(tmp_path, RELAYS), environ={})
    board = Agent(cfg)._open_board()  # what `edgesaga run` does before recovery
    try:
        history = {name: [s.state for s in board[name].gpio.pin.states] for name in board}
    finally:
        board.close()
    # mock pins are created low; `relay` never went high (no click), `lamp` (active low, safe on)
    # stays low, the fan went straight to its safe duty cycle
    assert history["relay"] == [False]
    assert history["lamp"] == [False]
    assert history["fan"] == [0.0, 0.25]


def test_initial_still_applies_to_a_board_built_outside_the_agent(tmp_path: Path) -> None:
    from hardware import Board, load_board_config

    path = _write(tmp_path, RELAYS, name="devices.yaml")
    with Board.from_config(load_board_config(path)) as board:
        assert board.snapshot() == {"relay": True, "lamp": False, "fan": 1.0, "level": False}


# -- issue 11, small defects: a definitions directory that does not exist yet ---------------------


def _desktop_copy_of_the_shipped_config(directory: Path, definitions: list[Path]) -> Path:
    """systemd/agent.yaml as `edgesaga run --config` reads it on a desktop: mock pins, no broker,
    its files in ``directory``, ``definitions`` instead of /etc/edgesaga/workflows."""
    data = yaml.safe_load((ROOT / "systemd" / "agent.yaml").read_text())
    data["database"] = str(directory / "state" / "edgesaga.db")
    data["control_socket"] = str(directory / "control.sock")
    data["definitions"] = [str(path) for path in definitions]
    data["mqtt"]["enabled"] = False
    data["hardware"]["pin_factory"] = "mock"
    return _write(directory, yaml.safe_dump(data))


def test_a_definitions_directory_not_created_yet_is_a_warning_and_the_bundled_ones_run(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "workflows"
    config = _desktop_copy_of_the_shipped_config(tmp_path, [missing])
    with agent_process(config, test_hooks=False) as agent:
        agent.wait_ready()
        wid = agent.start("PaymentProcessing", {"order_id": "O1", "customer_id": "C1", "amount": 5})
        assert agent.wait_status(wid, "COMPLETED", "FAILED")["status"] == "COMPLETED"
        agent.terminate()
        assert agent.wait_exit() == 0
        log = agent.log_text()
    assert (
        f"WARNING edgesaga.definitions: definitions directory {missing} does not exist yet, so no "
        "workflows are loaded from it; create it and put definitions there, then restart the "
        "agent.\n"
    ) in log
    # DailyIrrigation, Irrigation, SoilIrrigation, TwoBeds, PaymentProcessing, PaymentWithApproval
    assert "agent pi-garden-01: 6 workflow type(s) loaded" in log
    assert "error" not in log.lower()


def test_validate_agrees_a_definitions_directory_not_created_yet_is_only_a_warning(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "workflows"
    result = cli(_desktop_copy_of_the_shipped_config(tmp_path, [missing]), "validate")
    assert result.returncode == 0, result.stderr
    assert result.stderr == (
        f"WARNING edgesaga.definitions: definitions directory {missing} does not exist yet, so no "
        "workflows are loaded from it; create it and put definitions there, then restart the "
        "agent.\n"
    )
    assert result.stdout.splitlines()[-1] == "6 workflows, 30 steps"


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        # a path that exists but is not a directory: read as a definitions file, which it is not
        ("workflows", "notes\n", "must be a YAML mapping"),
        # a missing *.yaml entry names a definition file, not a directory to be created
        ("extra.yaml", None, "no such file or directory; check the definition path."),
        # a definition that fails to load
        ("broken/x.yaml", "workflow_type: X\n", "workflow_version"),
    ],
)
def test_a_definitions_path_that_is_not_a_directory_or_does_not_load_still_stops_the_agent(
    tmp_path: Path, name: str, content: str | None, problem: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    result = cli(
        _desktop_copy_of_the_shipped_config(tmp_path, [path.parent if "/" in name else path]), "run"
    )
    assert result.returncode == 2, result
    [line] = [x for x in result.stderr.splitlines() if x.startswith("edgesaga: error: ")]
    assert line.startswith(f"edgesaga: error: {path}")
    assert problem in line
    assert "Traceback" not in result.stderr


HA_NEEDS_MQTT = (
    "homeassistant: homeassistant.enabled needs the MQTT link, which is off (no mqtt section, or "
    "mqtt.enabled: false); add an mqtt section naming the broker, or set homeassistant.enabled to "
    "false."
)


@pytest.mark.parametrize(
    "text",
    [
        "homeassistant: {enabled: true}\n",  # no mqtt section: the link is off by default
        "mqtt: {host: broker, enabled: false}\nhomeassistant: {enabled: true}\n",
    ],
)
def test_home_assistant_without_mqtt_is_refused_at_load(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={})
    assert str(err.value) == f"{path}: {HA_NEEDS_MQTT}"


def test_home_assistant_with_mqtt_loads_and_mqtt_turned_off_by_the_environment_is_refused(
    tmp_path: Path,
) -> None:
    path = _write(tmp_path, "mqtt: {host: broker}\nhomeassistant: {enabled: true}\n")
    cfg = load_config(path, environ={})
    assert (cfg.mqtt.enabled, cfg.homeassistant.enabled) == (True, True)
    # Home Assistant off, MQTT off: nothing asked for that cannot be done.
    off = _write(tmp_path, "homeassistant: {enabled: false}\n", name="off.yaml")
    cfg = load_config(off, environ={})
    assert (cfg.mqtt.enabled, cfg.homeassistant.enabled) == (False, False)
    with pytest.raises(ConfigError) as err:
        load_config(path, environ={"EDGESAGA_MQTT__ENABLED": "false"})
    assert str(err.value) == f"{path}: {HA_NEEDS_MQTT}"


def test_an_invalid_mqtt_section_is_reported_before_home_assistant(tmp_path: Path) -> None:
    path = _write(tmp_path, "mqtt: {port: 0}\nhomeassistant: {enabled: true}\n")
    with pytest.raises(ConfigError, match=r"agent\.yaml: mqtt\.port: "):
        load_config(path, environ={})


def test_run_stops_with_the_sentence_when_home_assistant_has_no_mqtt(tmp_path: Path) -> None:
    config = _write(
        tmp_path,
        f"database: {tmp_path / 'edgesaga.db'}\ninclude_bundled: false\n"
        "homeassistant: {enabled: true}\n",
    )
    result = cli(config, "run")
    assert result.returncode == 2, result
    assert f"edgesaga: error: {config}: {HA_NEEDS_MQTT}" in result.stderr.splitlines()
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "edgesaga.db").exists()  # refused before anything was opened
