"""The test tree must not shadow the top-level packages it tests (issue 11, small defects)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_test_package_shadows_a_top_level_package() -> None:
    shadowing = [
        name for name in ("agent", "hardware", "workflows") if (ROOT / "tests" / name).exists()
    ]
    assert shadowing == []


def test_a_hardware_test_file_collects_from_a_checkout_that_is_not_installed(
    tmp_path: Path,
) -> None:
    """`pytest tests/test_hardware_steps.py` alone, with the repository only on the path that
    pytest's rootdir gives (no install): `import workflows` must find the real package."""
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.path.insert(0, 'tests'); sys.path.insert(1, '.');"
            " import workflows, pathlib; print(pathlib.Path(workflows.__file__).parent)",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == ROOT / "workflows"
