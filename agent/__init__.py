"""edgesaga: durable saga workflows for Raspberry-Pi-class devices.

The whole public API is listed in ``__all__``; everything else lives in private modules.

Names are imported from their modules on first use (PEP 562), so ``edgesaga run`` loads only what
it needs before it reports READY (the MQTT link, for instance, comes after).
"""

import importlib
import typing

if typing.TYPE_CHECKING:
    from agent._config import AgentConfig, ConfigError, MqttSettings, TlsSettings, load_config
    from agent._context import StepContext
    from agent._definition import (
        LoadedDefinition,
        RetryPolicy,
        StepDefinition,
        WorkflowDefinition,
        load_definition,
    )
    from agent._engine import Workflow, WorkflowBuilder
    from agent._errors import (
        AgentError,
        DatabaseLocked,
        DeadlineMissed,
        DefinitionError,
        DiskFull,
        InvalidData,
        InvalidInput,
        InvalidTransition,
        StepTimeout,
        StoreError,
        UnknownWorkflowType,
        WorkflowNotActive,
        WorkflowNotFound,
    )
    from agent._mqtt import MqttLink
    from agent._service import Agent
    from agent._status import WorkflowStatus
    from agent._store import InstanceRecord, JournalEntry, MemoryStore, OutboxItem, SQLiteStore
    from agent._timers import TimerService

__all__ = [
    "Agent",
    "AgentConfig",
    "AgentError",
    "ConfigError",
    "DatabaseLocked",
    "DeadlineMissed",
    "DefinitionError",
    "DiskFull",
    "InstanceRecord",
    "InvalidData",
    "InvalidInput",
    "InvalidTransition",
    "JournalEntry",
    "LoadedDefinition",
    "MemoryStore",
    "MqttLink",
    "MqttSettings",
    "OutboxItem",
    "RetryPolicy",
    "SQLiteStore",
    "StepContext",
    "StepDefinition",
    "StepTimeout",
    "StoreError",
    "TimerService",
    "TlsSettings",
    "UnknownWorkflowType",
    "Workflow",
    "WorkflowBuilder",
    "WorkflowDefinition",
    "WorkflowNotActive",
    "WorkflowNotFound",
    "WorkflowStatus",
    "load_config",
    "load_definition",
]

# The private module that defines each public name.
_MODULES = {
    "Agent": "_service",
    "AgentConfig": "_config",
    "AgentError": "_errors",
    "ConfigError": "_config",
    "DatabaseLocked": "_errors",
    "DeadlineMissed": "_errors",
    "DefinitionError": "_errors",
    "DiskFull": "_errors",
    "InstanceRecord": "_store",
    "InvalidData": "_errors",
    "InvalidInput": "_errors",
    "InvalidTransition": "_errors",
    "JournalEntry": "_store",
    "LoadedDefinition": "_definition",
    "MemoryStore": "_store",
    "MqttLink": "_mqtt",
    "MqttSettings": "_config",
    "OutboxItem": "_store",
    "RetryPolicy": "_definition",
    "SQLiteStore": "_store",
    "StepContext": "_context",
    "StepDefinition": "_definition",
    "StepTimeout": "_errors",
    "StoreError": "_errors",
    "TimerService": "_timers",
    "TlsSettings": "_config",
    "UnknownWorkflowType": "_errors",
    "Workflow": "_engine",
    "WorkflowBuilder": "_engine",
    "WorkflowDefinition": "_definition",
    "WorkflowNotActive": "_errors",
    "WorkflowNotFound": "_errors",
    "WorkflowStatus": "_status",
    "load_config": "_config",
    "load_definition": "_definition",
}


def __getattr__(name: str) -> typing.Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
