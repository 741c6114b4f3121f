"""``systemd/install.sh --root DIR`` builds an image that starts (issue 10 #18).

One image is built for the module with the real interpreter and pip (dependencies come from the
configured package index, as on a device). Its venv must name only its path on the device,
``/opt/edgesaga/venv``, and run there: the entry point is executed through that very path in a
private mount namespace whose ``/opt`` is the image's. The image's own Python sits at the build
host's path, as in an image of the same OS release. The service user must be able to read the
config: the user and group exist in the image's /etc and the config belongs to that group.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "/opt/edgesaga/venv"
BASE_PYTHON = os.path.realpath(sys.executable)  # what the venv's bin/python links to


def _source_tree(directory: Path) -> Path:
    """A copy of the source tree: pip builds in the tree it installs, and this one is shared."""
    copy = directory / "src"
    shutil.copytree(
        ROOT,
        copy,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            "build",
            "*.egg-info",
            "__pycache__",
            ".*_cache",
            ".hypothesis",
            "tests",
        ),
    )
    return copy


def _install(root: Path, *args: str, src: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(src / "systemd" / "install.sh"), "--root", str(root), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": ""},
        timeout=100,
        check=False,
    )


def _image_with_python(root: Path) -> None:
    """The image's python3 at the build host's path (a link to it: same OS release)."""
    target = root / BASE_PYTHON.lstrip("/")
    target.parent.mkdir(parents=True)
    target.symlink_to(BASE_PYTHON)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("image")
    _image_with_python(root)
    result = _install(root, "--python", BASE_PYTHON, src=_source_tree(tmp_path_factory.mktemp("s")))
    assert result.returncode == 0, result.stderr
    return root


def _group(root: Path, name: str) -> tuple[int, list[str]]:
    for line in (root / "etc/group").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2]), [m for m in fields[3].split(",") if m]
    raise AssertionError(f"no group {name} in the image's /etc/group")


def test_the_venv_names_only_its_path_on_the_device(image: Path) -> None:
    venv = image / PREFIX.lstrip("/")
    entry = (venv / "bin/edgesaga").read_text()
    assert entry.splitlines()[0] == f"#!{PREFIX}/bin/python"
    cfg = dict(
        line.split(" = ", 1) for line in (venv / "pyvenv.cfg").read_text().splitlines() if line
    )
    assert cfg["home"] == os.path.dirname(BASE_PYTHON)
    assert cfg["executable"] == BASE_PYTHON
    assert (image / cfg["executable"].lstrip("/")).exists()  # the interpreter is in the image
    assert cfg["command"].endswith(f" {PREFIX}")
    # No text file of the venv (scripts, activate, config, package metadata) names the staging
    # directory, which does not exist on the device.
    staging = str(image).encode()
    offenders = [
        str(p.relative_to(venv))
        for p in venv.rglob("*")
        if p.is_file() and not p.is_symlink() and p.suffix != ".pyc" and staging in p.read_bytes()
    ]
    assert offenders == []
    link = os.readlink(venv / "bin" / os.path.basename(BASE_PYTHON))
    assert link == BASE_PYTHON


def test_the_entry_point_runs_at_its_path_on_the_device(image: Path) -> None:
    """/opt of a private mount namespace is the image's and the staging directory is gone (an
    empty tmpfs over it), as on the device: the unit's ExecStart binary runs."""
    script = (
        f"mount --bind {image / 'opt'} /opt && mount -t tmpfs staging {image} && "
        f"{PREFIX}/bin/edgesaga --help && "
        f"{PREFIX}/bin/python -c 'import sys, agent._mqtt, gpiozero; print(sys.prefix)'"
    )
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: edgesaga")
    assert result.stdout.splitlines()[-1] == PREFIX


def test_the_service_user_can_read_the_config(image: Path) -> None:
    config = image / "etc/edgesaga/agent.yaml"
    gid, _ = _group(image, "edgesaga")
    assert config.stat().st_gid == gid
    assert stat.S_IMODE(config.stat().st_mode) == 0o640
    passwd = {
        line.split(":")[0]: line.split(":")
        for line in (image / "etc/passwd").read_text().splitlines()
    }
    assert int(passwd["edgesaga"][3]) == gid  # the service's primary group
    assert passwd["edgesaga"][5] == "/var/lib/edgesaga"
    assert _group(image, "gpio")[1] == ["edgesaga"]
    # At every boot systemd-tmpfiles keeps the config so, and systemd-sysusers makes the user
    # where an image was built without it.
    assert (image / "etc/sysusers.d/edgesaga.conf").read_text() == (
        ROOT / "systemd/sysusers.conf"
    ).read_text()
    assert (
        "z /etc/edgesaga/agent.yaml 0640 root edgesaga -"
        in (image / "etc/tmpfiles.d/edgesaga.conf").read_text()
    )


def test_tmpfiles_rule_gives_the_config_to_the_service_group(image: Path, tmp_path: Path) -> None:
    """The boot-time rule alone fixes a config left root:root (an image built without sysusers)."""
    other = tmp_path / "root"
    shutil.copytree(image / "etc", other / "etc", symlinks=True)
    config = other / "etc/edgesaga/agent.yaml"
    os.chown(config, 0, 0)
    result = subprocess.run(
        [
            "systemd-tmpfiles",
            f"--root={other}",
            "--create",
            str(other / "etc/tmpfiles.d/edgesaga.conf"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert config.stat().st_gid == _group(other, "edgesaga")[0]
    assert stat.S_IMODE(config.stat().st_mode) == 0o640


def test_an_image_without_that_python_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "bare"
    result = _install(root, "--python", BASE_PYTHON)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"install.sh: error: --root: {root} has no {BASE_PYTHON}")
    assert "--no-venv" in lines[-1]
    assert not (root / PREFIX.lstrip("/")).exists()  # nothing half-built
