"""The committed JSON Schemas (docs/schema/) are `edgesaga schema` output, the bundled YAML files
validate against them and name them on their first line, and broken copies do not validate."""

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from agent._cli import main
from agent._jsonschema import SCHEMAS

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_DIR = ROOT / "docs" / "schema"
# A workflow file is one the loader takes for one (a mapping with its `steps`); the agent configs
# (which may name workflow types in their schedules) are the shipped one and the irrigation job's.
WORKFLOW_FILES = sorted(
    p
    for p in (ROOT / "workflows").rglob("*.yaml")
    if isinstance(doc := yaml.safe_load(p.read_text(encoding="utf-8")), dict) and "steps" in doc
)
CONFIG_FILES = [ROOT / "systemd" / "agent.yaml", ROOT / "workflows" / "irrigation" / "agent.yaml"]


def _schema(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((SCHEMA_DIR / SCHEMAS[name]).read_text(encoding="utf-8"))
    return loaded


def _validator(name: str) -> jsonschema.Draft202012Validator:
    schema = _schema(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_committed_schema_is_the_command_output(
    name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["schema", name]) == 0
    printed = capsys.readouterr().out
    committed = (SCHEMA_DIR / SCHEMAS[name]).read_text(encoding="utf-8")
    assert printed == committed, (
        f"docs/schema/{SCHEMAS[name]} is stale: run `edgesaga schema {name} > "
        f"docs/schema/{SCHEMAS[name]}`"
    )


def test_every_step_type_and_config_key_is_in_the_schemas() -> None:
    from agent._config import AgentConfig
    from agent._definition import STEP_KEYS, StepDefinition

    step = _schema("workflow")["$defs"]["StepDefinition"]
    assert set(step["properties"]["type"]["enum"]) == set(STEP_KEYS)
    assert set(step["properties"]) == set(StepDefinition.model_fields)
    assert set(_schema("config")["properties"]) == set(AgentConfig.model_fields)


@pytest.mark.parametrize(
    ("path", "name"),
    [(p, "workflow") for p in WORKFLOW_FILES] + [(p, "config") for p in CONFIG_FILES],
    ids=lambda v: v.name if isinstance(v, Path) else v,
)
def test_bundled_files_name_and_match_their_schema(path: Path, name: str) -> None:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    target = first.removeprefix("# yaml-language-server: $schema=")
    assert target != first, f"{path} does not start with the yaml-language-server line"
    assert (path.parent / target).resolve() == (SCHEMA_DIR / SCHEMAS[name]).resolve()
    errors = list(_validator(name).iter_errors(yaml.safe_load(path.read_text(encoding="utf-8"))))
    assert errors == []


def test_bundled_workflows_are_found() -> None:
    names = {p.name for p in WORKFLOW_FILES}
    assert {"payment.yaml", "soil.yaml", "two_beds.yaml", "payment_approval.yaml"} <= names


def _payment() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(
        (ROOT / "workflows" / "payment" / "payment.yaml").read_text(encoding="utf-8")
    )
    return loaded


def _broken_workflows() -> dict[str, dict[str, Any]]:
    base = _payment()
    cases: dict[str, dict[str, Any]] = {}
    unknown = copy.deepcopy(base)
    unknown["step"] = []
    cases["unknown top-level key"] = unknown
    unknown_step = copy.deepcopy(base)
    unknown_step["steps"][0]["compensation"] = "x.y"
    cases["unknown step key"] = unknown_step
    wrong = copy.deepcopy(base)
    wrong["saga_mode"] = "sometimes"
    cases["wrong type"] = wrong
    missing = copy.deepcopy(base)
    del missing["initial_state_model"]
    cases["missing required"] = missing
    bad_type = copy.deepcopy(base)
    bad_type["steps"][1]["type"] = "LOOP"
    cases["bad step type"] = bad_type
    misplaced = copy.deepcopy(base)
    misplaced["steps"][0]["routes"] = {"a": "END"}
    cases["a key the step's type does not take"] = misplaced
    no_routes = copy.deepcopy(base)
    no_routes["steps"][0]["type"] = "DECISION"
    del no_routes["steps"][0]["compensate_function"]
    cases["a DECISION without routes"] = no_routes
    return cases


@pytest.mark.parametrize("case", sorted(_broken_workflows()))
def test_broken_workflow_copies_do_not_validate(case: str) -> None:
    assert _validator("workflow").is_valid(_payment())
    assert not _validator("workflow").is_valid(_broken_workflows()[case])


@pytest.mark.parametrize(
    "change",
    [
        {"max_concurent": 4},  # unknown key
        {"max_concurrent": "many"},  # wrong type
        {"mqtt": {"port": 70000}},  # out of range
        {"logging": {"format": "xml"}},  # not one of the choices
        {"schedules": [{"cron": "0 6 * * *"}]},  # a schedule missing its workflow type
    ],
    ids=["unknown key", "wrong type", "out of range", "bad choice", "missing required"],
)
def test_broken_config_copies_do_not_validate(change: dict[str, Any]) -> None:
    config = yaml.safe_load(CONFIG_FILES[0].read_text(encoding="utf-8"))
    assert _validator("config").is_valid(config)
    for key, value in change.items():
        config[key] = value
    assert not _validator("config").is_valid(config)
