"""edgesaga: durable saga workflows for Raspberry-Pi-class devices.

The whole public API is listed in ``__all__``; everything else lives in private modules.
"""

from agent._config import AgentConfig, ConfigError, load_config
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
    DefinitionError,
    DiskFull,
    InvalidData,
    InvalidTransition,
    StepTimeout,
    StoreError,
    UnknownWorkflowType,
    WorkflowNotActive,
    WorkflowNotFound,
)
from agent._mqtt import MqttLink, MqttSettings, TlsSettings
from agent._service import Agent
from agent._status import WorkflowStatus
from agent._store import InstanceRecord, JournalEntry, MemoryStore, OutboxItem, SQLiteStore

__all__ = [
    "Agent",
    "AgentConfig",
    "AgentError",
    "ConfigError",
    "DatabaseLocked",
    "DefinitionError",
    "DiskFull",
    "InstanceRecord",
    "InvalidData",
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
