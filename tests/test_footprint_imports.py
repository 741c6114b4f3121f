"""What `edgesaga run` does not load when the config leaves a feature out (docs/benchmarks.md,
Footprint): cronsim and the scheduler only with schedules, Home Assistant only when enabled.

Each check runs in a fresh interpreter, as the agent starts: an import made by an earlier test in
this process would hide one made at start-up.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _loaded_after(code: str, modules: list[str], tmp_path: Path) -> list[str]:
    """The names in ``modules`` that ``sys.modules`` holds after ``code`` ran in a new Python."""
    script = textwrap.dedent(code) + textwrap.dedent(
        f"""
        import sys
        print(",".join(m for m in {modules!r} if m in sys.modules))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return [m for m in done.stdout.strip().split(",") if m]


LAZY = ["cronsim", "agent._scheduler", "agent._homeassistant"]


def test_an_agent_without_schedules_or_home_assistant_loads_neither(tmp_path: Path) -> None:
    (tmp_path / "agent.yaml").write_text(f"database: {tmp_path / 'edgesaga.db'}\n")
    code = """
        import agent._cli, agent._service
        from agent._config import load_config
        load_config("agent.yaml")
    """
    assert _loaded_after(code, LAZY, tmp_path) == []


def test_a_config_with_a_schedule_loads_cronsim_to_check_it(tmp_path: Path) -> None:
    # The other side of the test above: the import moved, it did not go away.
    (tmp_path / "agent.yaml").write_text(
        f"database: {tmp_path / 'edgesaga.db'}\n"
        "schedules:\n"
        "  - {name: morning, cron: '0 6 * * *', timezone: UTC, workflow_type: Irrigation}\n"
    )
    code = """
        from agent._config import load_config
        load_config("agent.yaml")
    """
    assert _loaded_after(code, LAZY, tmp_path) == ["cronsim"]
