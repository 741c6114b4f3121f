"""JSON Schemas of the workflow YAML and the agent config, generated from their pydantic models.

``edgesaga schema workflow|config`` prints them; the committed copies under ``docs/schema/`` let
an editor (VS Code's YAML extension, through a ``# yaml-language-server: $schema=...`` first line)
validate and complete a file as it is typed. The agent itself validates with pydantic, not these.
"""

from __future__ import annotations

import json
from typing import Any

#: What ``edgesaga schema`` can print: the name and the committed file under docs/schema/.
SCHEMAS = {"workflow": "workflow.schema.json", "config": "config.schema.json"}
_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def _step_rules() -> list[dict[str, Any]]:
    """One if/then per step type: the keys it takes (as the loader's key check) and the ones it
    needs, so an editor flags ``routes`` on a STANDARD step and a DECISION without them."""
    from agent._definition import STEP_KEYS

    needs = {
        "STANDARD": ["function"],
        "DECISION": ["function", "routes"],
        "PARALLEL": ["branches"],
    }
    rules: list[dict[str, Any]] = []
    for step_type, keys in STEP_KEYS.items():
        condition: dict[str, Any] = {"properties": {"type": {"const": step_type}}}
        if step_type != "STANDARD":  # no `type` key means STANDARD
            condition["required"] = ["type"]
        then: dict[str, Any] = {"propertyNames": {"enum": sorted(keys | {"type"})}}
        if step_type in needs:
            then["required"] = needs[step_type]
        rules.append({"if": condition, "then": then})
    return rules


def workflow_schema() -> dict[str, Any]:
    """The JSON Schema of one workflow definition file."""
    from agent._definition import WorkflowDefinition

    schema = WorkflowDefinition.model_json_schema()
    schema["$defs"]["StepDefinition"]["allOf"] = _step_rules()
    return {"$schema": _DIALECT, "title": "edgesaga workflow definition", **_untitled(schema)}


def config_schema() -> dict[str, Any]:
    """The JSON Schema of the agent config (``agent.yaml``)."""
    from agent._config import AgentConfig

    schema = AgentConfig.model_json_schema()
    # The default is the board's host name: not a value to write into a schema.
    schema["properties"]["device_id"].pop("default", None)
    return {"$schema": _DIALECT, "title": "edgesaga agent config", **_untitled(schema)}


def _untitled(schema: dict[str, Any]) -> dict[str, Any]:
    schema.pop("title", None)
    return schema


def schema_text(name: str) -> str:
    """The schema ``name`` (a key of :data:`SCHEMAS`) as the text of its committed file."""
    build = {"workflow": workflow_schema, "config": config_schema}[name]
    return json.dumps(build(), indent=2, ensure_ascii=False, sort_keys=True) + "\n"


def missing_descriptions(name: str) -> list[str]:
    """Dotted paths of the properties in schema ``name`` that have no description."""
    schema = {"workflow": workflow_schema, "config": config_schema}[name]()
    found: list[str] = []
    parts = [("", schema), *((f"$defs.{k}", v) for k, v in schema.get("$defs", {}).items())]
    for where, part in parts:
        for key, prop in part.get("properties", {}).items():
            if "description" not in prop:
                found.append(f"{where}.{key}".lstrip("."))
    return found
