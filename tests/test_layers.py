"""The layers import downwards only: ``hardware`` knows nothing of ``agent``, and below the CLI and
the service no module of ``agent`` imports ``workflows`` (the bundled-definitions directory is
handed down from the top).

Each runtime check runs in a fresh interpreter, so what other tests imported cannot mask it; the
static checks read every import statement, also those inside functions that run only later.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: The modules of ``agent`` above the loader, engine and store: they may import ``workflows``.
TOP = frozenset({"_cli.py", "_service.py", "__main__.py"})


def _imported(path: Path) -> list[tuple[int, str]]:
    """``(line, absolute module name)`` of every import in the file (relative ones resolved)."""
    package = path.parent.name
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package if node.level else ""
            name = ".".join(part for part in (base, node.module or "") if part)
            found.append((node.lineno, name))
    return found


def _crossings(
    directory: str, forbidden: str, allowed: frozenset[str] = frozenset()
) -> list[tuple[str, str]]:
    """``(file, module)`` of every import of ``forbidden`` (or a module in it) in ``directory``."""
    hits = []
    for path in sorted((ROOT / directory).rglob("*.py")):
        if path.name in allowed:
            continue
        for _, name in _imported(path):
            if name == forbidden or name.startswith(forbidden + "."):
                hits.append((str(path.relative_to(ROOT)), name))
    return hits


def _loaded_after(code: str, package: str) -> list[str]:
    """The modules of ``package`` in ``sys.modules`` after ``code`` ran in a fresh interpreter."""
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            f"{code}\nimport sys\n"
            f"print(sorted(m for m in sys.modules if m.partition('.')[0] == {package!r}))",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return ast.literal_eval(proc.stdout.strip())  # type: ignore[no-any-return]


def test_nothing_in_hardware_imports_agent() -> None:
    assert _crossings("hardware", "agent") == []


def test_only_the_cli_and_the_service_import_workflows() -> None:
    assert _crossings("agent", "workflows", TOP) == []


def test_the_static_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    """The checks above would pass on a checker that looked only at the top of each file."""
    module = tmp_path / "hardware" / "late.py"
    module.parent.mkdir()
    module.write_text("def f():\n    from agent._engine import WorkflowBuilder\n    import agent\n")
    assert _imported(module) == [(2, "agent._engine"), (3, "agent")]


def test_importing_all_of_hardware_loads_nothing_of_agent() -> None:
    code = (
        "import importlib, pkgutil, hardware\n"
        "for m in pkgutil.walk_packages(hardware.__path__, 'hardware.'):\n"
        "    importlib.import_module(m.name)"
    )
    assert _loaded_after(code, "agent") == []


def test_loading_definitions_below_the_cli_loads_nothing_of_workflows() -> None:
    """Every module of ``agent`` but the top ones imported, then definitions checked and loaded
    into a builder as the agent does: none of it reaches for the ``workflows`` package."""
    below = sorted(p.stem for p in (ROOT / "agent").glob("_*.py") if p.name not in TOP)
    code = (
        "import importlib\n"
        f"for name in {below!r}:\n"
        "    importlib.import_module('agent.' + name)\n"
        "from agent._validate import check_definitions\n"
        "from agent._engine import WorkflowBuilder\n"
        "checked = check_definitions(['tests/flows/service'])\n"
        "assert checked.loaded and not checked.problems, checked\n"
        "WorkflowBuilder(definitions=['tests/flows/service'])"
    )
    assert _loaded_after(code, "workflows") == []
