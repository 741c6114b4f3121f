"""Fuzzing the YAML edgesaga reads: whatever a definition, an agent config or a devices file holds,
loading it either works or raises the documented error with one sentence; never another
exception, a hang or a traceback (issue 10, acceptance).

Two sources of input: arbitrary mappings (YAML written from random data, with the schema's keys
mixed in so the checks past the parser are reached) and mutations of the real files (the bundled
workflows, the test definitions, the example agent config, the irrigation devices file): bytes
cut, inserted, repeated or swapped, YAML punctuation and aliases included. Time is bounded by
``max_examples`` and a per-example deadline; an example that hangs fails the test.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from _engine_fixtures import DEFS_DIR, MODEL, ROOT, STEPS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import DefinitionError, load_definition
from agent._config import ConfigError, load_config
from hardware import ConfigError as HardwareConfigError
from hardware import load_board_config

FUZZ = settings(
    max_examples=200,
    deadline=5000,  # milliseconds: generous on a loaded machine, and still catches a hang
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,  # the same inputs on every run: a failure reproduces
)

DEFINITION_FILES = sorted(
    [
        ROOT / "workflows" / "payment" / "payment.yaml",
        ROOT / "workflows" / "irrigation" / "irrigation.yaml",
        *DEFS_DIR.glob("*.yaml"),
    ]
)
CONFIG_FILE = ROOT / "systemd" / "agent.yaml"
DEVICES_FILE = ROOT / "workflows" / "irrigation" / "devices.yaml"

# Dotted paths the fuzzer may use: real ones, wrong ones. Never free text, so nothing imports a
# module that does something when imported.
DOTTED = st.sampled_from(
    [
        f"{STEPS}.record",
        f"{STEPS}.needs_level",
        f"{STEPS}.nope",
        "hardware.steps.set_output",
        "hardware.steps.wait_for_input",
        "hardware.steps.read_input",
        "hardware.steps.run_for",
        MODEL,
        "hardware.HardwareState",
        "workflows.payment.models.PaymentState",
        "tests.flows.engine.models.NotAModel",
        "no_such_module_xyz.thing",
        "nodots",
        "",
    ]
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    DOTTED,
)
VALUES = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.one_of(st.text(max_size=15), DOTTED), children, max_size=5),
    ),
    max_leaves=40,
)
STEP_KEYS = [
    "name",
    "type",
    "function",
    "compensate_function",
    "automate_next",
    "params",
    "retry",
    "compensate_retry",
    "max_interrupts",
    "timeout",
    "description",
]
TOP_KEYS = [
    "workflow_type",
    "workflow_version",
    "initial_state_model",
    "description",
    "saga_mode",
    "resources",
    "steps",
]
PARAMS = st.dictionaries(
    st.sampled_from(["device", "value", "field", "elapsed_field", "seconds", "timeout", "level"]),
    VALUES,
    max_size=4,
)
STEP = st.fixed_dictionaries(
    {"name": st.one_of(st.text(max_size=10), SCALARS), "function": DOTTED},
    optional={
        key: (PARAMS if key == "params" else DOTTED if key.endswith("function") else VALUES)
        for key in STEP_KEYS
        if key not in ("name", "function")
    },
)
DEFINITION = st.fixed_dictionaries(
    {},
    optional={
        "workflow_type": st.one_of(st.text(max_size=20), SCALARS),
        "workflow_version": SCALARS,
        "initial_state_model": DOTTED,
        "description": VALUES,
        "saga_mode": VALUES,
        "resources": VALUES,
        "steps": st.one_of(st.lists(STEP, max_size=4), VALUES),
    },
).flatmap(
    lambda base: st.dictionaries(st.text(max_size=12), VALUES, max_size=2).map(
        lambda extra: {**extra, **base}
    )
)

# Mutations of a text: what a careless edit, a truncated copy or an attacker might produce.
PUNCTUATION = st.sampled_from(
    [*":-?[]{},&*!|>'\"%@`#\n\t ", "&a ", "*a", "<<: ", "!!python/object ", "---\n", "..."]
)


@st.composite
def mutated(draw: st.DrawFn, texts: list[str]) -> str:
    text = draw(st.sampled_from(texts))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        at = draw(st.integers(min_value=0, max_value=len(text)))
        kind = draw(st.sampled_from(["cut", "insert", "repeat", "swap_lines", "punctuation"]))
        if kind == "cut":
            text = text[:at] + text[at + draw(st.integers(min_value=1, max_value=40)) :]
        elif kind == "insert":
            text = text[:at] + draw(st.text(max_size=10)) + text[at:]
        elif kind == "punctuation":
            text = text[:at] + draw(PUNCTUATION) + text[at:]
        elif kind == "repeat":
            end = min(len(text), at + draw(st.integers(min_value=1, max_value=80)))
            text = (
                text[:end] + text[at:end] * draw(st.integers(min_value=1, max_value=3)) + text[end:]
            )
        else:
            lines = text.splitlines(keepends=True)
            if len(lines) > 1:
                i = draw(st.integers(min_value=0, max_value=len(lines) - 1))
                j = draw(st.integers(min_value=0, max_value=len(lines) - 1))
                lines[i], lines[j] = lines[j], lines[i]
                text = "".join(lines)
    return text


def _texts(paths: list[Path]) -> list[str]:
    return [p.read_text(encoding="utf-8") for p in paths]


def assert_one_sentence(exc: BaseException) -> None:
    message = str(exc)
    assert message, f"{type(exc).__name__} without a message"
    assert "\n" not in message, message
    assert "Traceback" not in message, message
    assert message.rstrip().endswith("."), message


@pytest.fixture
def fuzz_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "fuzzed.yaml"


@pytest.fixture(autouse=True)
def _keep_sys_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))


def load_or_refuse(path: Path) -> None:
    try:
        load_definition(path)
    except DefinitionError as exc:
        assert_one_sentence(exc)


@FUZZ
@given(data=DEFINITION)
def test_arbitrary_mappings_as_definitions(fuzz_file: Path, data: dict[str, Any]) -> None:
    fuzz_file.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    load_or_refuse(fuzz_file)


@FUZZ
@given(text=mutated(_texts(DEFINITION_FILES)))
def test_mutated_definitions(fuzz_file: Path, text: str) -> None:
    fuzz_file.write_text(text, encoding="utf-8", errors="surrogatepass")
    load_or_refuse(fuzz_file)


@FUZZ
@given(text=mutated(_texts([CONFIG_FILE])))
def test_mutated_agent_configs(fuzz_file: Path, text: str) -> None:
    fuzz_file.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_config(fuzz_file, environ={})
    except ConfigError as exc:
        assert_one_sentence(exc)


def devices_error(path: Path) -> str | None:
    try:
        load_board_config(path)
    except HardwareConfigError as exc:
        return str(exc)
    return None


@FUZZ
@given(text=mutated(_texts([DEVICES_FILE])))
def test_mutated_devices_files(fuzz_file: Path, text: str) -> None:
    fuzz_file.write_text(text, encoding="utf-8", errors="surrogatepass")
    message = devices_error(fuzz_file)
    if message is not None:  # a devices file lists every problem, one sentence per line
        assert "Traceback" not in message
        for line in message.splitlines():
            assert line.rstrip().endswith((".", ":")), message
