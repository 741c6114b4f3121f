"""The systemd unit, the example agent config and install.sh, checked with the real tools.

``systemd-analyze`` works without a running systemd: ``verify`` parses the unit and ``security
--offline=yes`` scores its hardening from the file alone. Both ship with systemd, which is on the
development machines and in CI; only those tests skip where it is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from agent._config import load_config

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "edgesaga.service"
INSTALL = ROOT / "systemd" / "install.sh"
EXAMPLE_CONFIG = ROOT / "systemd" / "agent.yaml"
EXEC_PATH = "/opt/edgesaga/venv/bin/edgesaga"

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (it comes with the systemd package)",
)

# Plain output: no colours, no pager, no attempt to reach a manager over D-Bus.
TOOL_ENV = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "SYSTEMD_LOG_COLOR": "0"}


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *args],
        capture_output=True,
        text=True,
        env=TOOL_ENV,
        timeout=60,
        check=False,
    )


def _directives(text: str) -> dict[str, dict[str, list[str]]]:
    """``{section: {key: [values in order]}}``; keys may repeat, as in real unit files."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"directive outside a section: {raw!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a KEY=value line: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _seconds(value: str) -> float:
    """A systemd time span with the units this unit uses (``30``, ``30s``, ``1min``)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min|m)?", value)
    assert match, f"unexpected time span {value!r}"
    number = float(match[1])
    return number * 60 if match[2] in ("min", "m") else number


def _unit_with_stub_exec(tmp_path: Path) -> Path:
    """A copy of the unit whose ExecStart points at an executable stub that exists.

    ``systemd-analyze verify`` checks that ExecStart's binary exists and is executable, and the
    real one (/opt/edgesaga/venv/bin/edgesaga) only exists once install.sh has run. ``--root=`` does
    not help: the unit's dependencies (sysinit.target, ...) are then looked up under that root as
    well. So only the binary's path changes in the copy; every other line is verified as written.
    """
    stub = tmp_path / "bin" / "edgesaga"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = UNIT.read_text()
    patched, count = re.subn(
        rf"^ExecStart={re.escape(EXEC_PATH)} ", f"ExecStart={stub} ", text, flags=re.M
    )
    assert count == 1, "expected exactly one ExecStart line to patch"
    copy = tmp_path / "edgesaga.service"  # same name: the unit name matters to verify
    copy.write_text(patched)
    return copy


# --- systemd-analyze --------------------------------------------------------------------------


@needs_systemd_analyze
def test_verify_is_clean(tmp_path: Path) -> None:
    result = _analyze("verify", str(_unit_with_stub_exec(tmp_path)))
    assert result.stdout + result.stderr == ""
    assert result.returncode == 0


@needs_systemd_analyze
def test_verify_of_the_unit_as_shipped_only_misses_the_installed_binary() -> None:
    result = _analyze("verify", str(UNIT))
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if line]
    # Empty where install.sh has run; otherwise the missing binary is the only complaint.
    assert all(EXEC_PATH in line for line in complaints), complaints


@needs_systemd_analyze
def test_verify_would_catch_a_mistake(tmp_path: Path) -> None:
    """The check above can fail: an unknown key in the same unit makes verify speak up."""
    unit = _unit_with_stub_exec(tmp_path)
    unit.write_text(unit.read_text().replace("[Service]\n", "[Service]\nProtectEverything=yes\n"))
    result = _analyze("verify", str(unit))
    assert "ProtectEverything" in result.stdout + result.stderr


@needs_systemd_analyze
def test_security_exposure_is_ok() -> None:
    result = _analyze("security", "--offline=yes", "--no-pager", str(UNIT))
    output = result.stdout + result.stderr
    match = re.search(
        r"Overall exposure level for edgesaga\.service: (\d+(?:\.\d+)?) (\w+)", output
    )
    assert match, output
    score, verdict = float(match[1]), match[2]
    assert score <= 2.0, f"exposure {score} {verdict}; target is 2.0 or lower:\n{output}"
    assert verdict == "OK"
    # Spot-check that the score rests on the settings meant to carry it.
    for setting in (
        "NoNewPrivileges=",
        "ProtectSystem=",
        "SystemCallFilter=~@privileged",
        "CapabilityBoundingSet=~CAP_SYS_ADMIN",
        "RestrictAddressFamilies=~AF_PACKET",
    ):
        assert re.search(rf"^✓ {re.escape(setting)}", output, flags=re.M), setting


# --- the unit's contents ----------------------------------------------------------------------


def test_unit_has_the_required_directives() -> None:
    service = _directives(UNIT.read_text())["Service"]

    def one(key: str) -> str:
        assert key in service, f"{key}= missing from [Service]"
        assert len(service[key]) == 1, f"{key}= given more than once"
        return service[key][0]

    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert one("ExecStart") == f"{EXEC_PATH} run --config /etc/edgesaga/agent.yaml"
    assert _seconds(one("WatchdogSec")) == 30
    assert one("Restart") == "on-failure"
    assert _seconds(one("RestartSec")) == 5
    assert (one("User"), one("Group"), one("SupplementaryGroups")) == (
        "edgesaga",
        "edgesaga",
        "gpio",
    )
    assert one("StateDirectory") == "edgesaga"
    assert one("RuntimeDirectory") == "edgesaga"
    assert one("ConfigurationDirectory") == "edgesaga"
    assert one("WorkingDirectory") == "/run/" + one("RuntimeDirectory")
    assert one("DevicePolicy") == "closed"
    assert "char-gpiochip rw" in service["DeviceAllow"]
    assert one("UMask") == "0027"
    assert one("CapabilityBoundingSet") == ""
    assert one("AmbientCapabilities") == ""
    assert one("SystemCallArchitectures") == "native"
    assert service["SystemCallFilter"] == ["@system-service", "~@privileged @resources"]
    assert one("RestrictAddressFamilies").split() == ["AF_UNIX", "AF_INET", "AF_INET6"]
    # PrivateDevices=yes would hide /dev/gpiochip*; PrivateUsers=yes would unmap the gpio group.
    assert service.get("PrivateDevices", ["no"]) == ["no"]
    assert service.get("PrivateUsers", ["no"]) == ["no"]


def test_stop_timeout_leaves_room_for_the_grace_period() -> None:
    service = _directives(UNIT.read_text())["Service"]
    grace = yaml.safe_load(EXAMPLE_CONFIG.read_text())["grace_period"]
    assert grace == 10  # the agent's default, shown in the example
    # Grace period, then outputs safe and `offline` published: TimeoutStopSec must exceed it.
    assert _seconds(service["TimeoutStopSec"][0]) >= grace + 10


def test_example_config_follows_the_draft_schema() -> None:
    config = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    assert config == {
        "device_id": "pi-garden-01",
        "database": "/var/lib/edgesaga/edgesaga.db",
        "definitions": ["/etc/edgesaga/workflows"],
        "max_concurrent": 4,
        "grace_period": 10,
        "control_socket": "/run/edgesaga/control.sock",
        "retention": {"max_age_days": 30, "max_finished": 1000},
        "logging": {"level": "INFO", "format": "text"},
        "mqtt": {
            "enabled": True,
            "host": "localhost",
            "port": 1883,
            "client_id": None,
            "keepalive": 30,
            "version": "5",
            "topic_prefix": "edgesaga",
            "username": None,
            "password_file": None,
            "tls": None,  # plain MQTT unless a tls section is given
            "max_payload": 65536,
            "outbox_cap": 100000,
        },
        "hardware": {
            "pin_factory": None,
            "devices": {
                "valve": {"kind": "output", "pin": 17, "safe": False},
                "pump": {"kind": "output", "pin": 27, "safe": False},
                "level": {"kind": "input", "pin": 22, "pull_up": True},
            },
        },
    }


def test_example_config_loads_with_the_agents_loader() -> None:
    config = load_config(EXAMPLE_CONFIG, environ={})
    assert config.device_id == "pi-garden-01"
    assert config.grace_period == 10
    assert config.mqtt.enabled is True


def test_example_config_paths_are_inside_the_units_directories() -> None:
    """The hardened service can write only its State/Runtime directories; the config must agree."""
    config = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    service = _directives(UNIT.read_text())["Service"]
    assert Path(config["database"]).parent == Path("/var/lib") / service["StateDirectory"][0]
    assert Path(config["control_socket"]).parent == Path("/run") / service["RuntimeDirectory"][0]
    assert all(
        Path(d).is_relative_to(Path("/etc") / service["ConfigurationDirectory"][0])
        for d in config["definitions"]
    )


# --- install.sh ---------------------------------------------------------------------------------


def _install(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(INSTALL), *args],
        capture_output=True,
        text=True,
        env=env or TOOL_ENV,
        timeout=120,
        check=False,
    )


def test_install_script_parses() -> None:
    result = subprocess.run(
        ["bash", "-n", str(INSTALL)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert INSTALL.read_text().startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in INSTALL.read_text()
    assert INSTALL.stat().st_mode & stat.S_IXUSR


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_install_script_passes_shellcheck() -> None:
    result = subprocess.run(
        ["shellcheck", str(INSTALL)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout


def test_install_help_and_bad_arguments() -> None:
    result = _install("--help")
    assert result.returncode == 0
    assert "--no-start" in result.stdout
    assert "--root" in result.stdout

    result = _install("--frobnicate")
    assert result.returncode == 2
    assert "--frobnicate" in result.stderr


def test_install_into_a_root_directory_is_idempotent(tmp_path: Path) -> None:
    root = tmp_path / "root"
    result = _install("--root", str(root), "--no-venv")
    assert result.returncode == 0, result.stderr

    config = root / "etc/edgesaga/agent.yaml"
    assert config.read_text() == EXAMPLE_CONFIG.read_text()
    assert stat.S_IMODE(config.stat().st_mode) == 0o640  # may hold a broker user name
    assert (root / "etc/sysusers.d/edgesaga.conf").is_file()
    assert (root / "etc/tmpfiles.d/edgesaga.conf").is_file()
    assert (root / "etc/edgesaga/workflows").is_dir()
    installed_unit = root / "etc/systemd/system/edgesaga.service"
    assert installed_unit.read_text() == UNIT.read_text()
    assert (root / "opt/edgesaga/doc/deploy.md").is_file()
    assert not (root / "opt/edgesaga/venv").exists()  # --no-venv
    if shutil.which("systemctl"):
        link = root / "etc/systemd/system/multi-user.target.wants/edgesaga.service"
        assert os.readlink(link) == "/etc/systemd/system/edgesaga.service"

    # A user's edits survive a second run (the upgrade path); the unit is refreshed.
    config.write_text(config.read_text().replace("pi-garden-01", "pi-shed-02"))
    installed_unit.write_text("# stale\n")
    result = _install("--root", str(root), "--no-venv")
    assert result.returncode == 0, result.stderr
    assert "device_id: pi-shed-02" in config.read_text()
    assert "keeping existing" in result.stderr
    assert installed_unit.read_text() == UNIT.read_text()


def test_install_creates_the_venv_once_and_pip_installs_the_source_tree(tmp_path: Path) -> None:
    """A stand-in interpreter records what install.sh asks of it (no network, no real venv)."""
    log = tmp_path / "python.log"
    fake_python = tmp_path / "fake-python"
    fake_python.write_text(
        "#!/bin/sh\n"
        'echo "$*" >> "$FAKE_PYTHON_LOG"\n'
        'if [ "$1" = "-c" ]; then echo /usr/bin/python3; fi\n'  # where it is in the image
        'if [ "$1 $2" = "-m venv" ]; then\n'
        '  for last in "$@"; do :; done\n'
        '  mkdir -p "$last/bin" && cp "$0" "$last/bin/python"\n'
        "fi\n"
    )
    fake_python.chmod(0o755)
    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/python3").symlink_to(fake_python)
    env = {**TOOL_ENV, "FAKE_PYTHON_LOG": str(log)}
    venv = root / "opt/edgesaga/venv"
    pip_call = f"-m pip install --quiet --disable-pip-version-check --upgrade {ROOT}"
    where = "-c import os, sys; print(os.path.realpath(sys.executable))"

    for _ in range(2):
        result = _install("--root", str(root), "--python", str(fake_python), env=env)
        assert result.returncode == 0, result.stderr

    assert log.read_text().splitlines() == [
        where,
        f"-m venv --system-site-packages {venv}",
        pip_call,
        where,
        pip_call,  # the second run reuses the venv and upgrades in place
    ]
