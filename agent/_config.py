"""The agent config (``agent.yaml``): pydantic, unknown keys rejected, ``EDGESAGA_...`` overrides."""

# No `from __future__ import annotations` here: pydantic would have to evaluate each field's
# annotation from its text (compiling it) when the models are built, at every start of the agent.

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from agent._clock import ClockConfig
from agent._definition import (
    YamlLimits,
    YamlRefused,
    read_yaml_text,
    safe_load_yaml,
    yaml_problem,
)
from agent._errors import AgentError
from agent._schedules import ScheduleList
from hardware import BoardConfig

ENV_PREFIX = "EDGESAGA_"


class ConfigError(AgentError, ValueError):
    """Raised when the agent config is unreadable or invalid; names the file and the key."""


class RetentionSettings(BaseModel):
    """How long finished workflows are kept (both limits apply)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_age_days: float | None = Field(
        30.0,
        gt=0,
        description="Delete finished workflows older than this many days (null: no age limit).",
    )
    max_finished: int | None = Field(
        1000,
        ge=0,
        description="Keep at most this many finished workflows (null: no count limit).",
    )
    interval: float = Field(3600.0, gt=0, description="Seconds between pruning runs.")


class LoggingSettings(BaseModel):
    """Logging: plain text lines for journald, or JSON lines."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="DEBUG, INFO, WARNING or ERROR (any case)."
    )
    format: Literal["text", "json"] = Field(
        "text", description="text lines, or json: one object per line."
    )

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class TlsSettings(BaseModel):
    """``mqtt.tls``: verify the broker with ``ca_file`` (system CAs when omitted) and optionally
    present a client certificate. ``insecure`` skips the host name check (the chain is still
    verified); use it only for a broker reached by an address its certificate does not name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ca_file: Path | None = Field(
        None, description="CA certificate(s) to verify the broker with (default: the system CAs)."
    )
    cert_file: Path | None = Field(None, description="Client certificate (PEM) to present.")
    key_file: Path | None = Field(None, description="Its private key; needs cert_file.")
    insecure: bool = Field(
        False, description="Skip the host-name check (the chain is still verified)."
    )

    @model_validator(mode="after")
    def _key_needs_cert(self) -> Self:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError(
                "mqtt.tls.key_file is set without mqtt.tls.cert_file; set both or neither."
            )
        return self


class MqttSettings(BaseModel):
    """The ``mqtt:`` section of the agent config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="Connect to a broker.")
    host: str = Field("localhost", min_length=1, description="Broker host name or address.")
    port: int = Field(1883, ge=1, le=65535, description="Broker port.")
    client_id: str | None = Field(
        None,
        min_length=1,
        max_length=128,
        description="MQTT client id (default edgesaga-<device_id>); unique per device.",
    )
    keepalive: int = Field(30, ge=5, le=65535, description="Keep-alive interval in seconds.")
    version: Literal["5", "3.1.1"] = Field("5", description='"5" or "3.1.1".')
    topic_prefix: str = Field(
        "edgesaga", min_length=1, max_length=200, description="First level(s) of every topic."
    )
    username: str | None = Field(None, description="User name for the broker.")
    password_file: Path | None = Field(None, description="File holding only the password.")
    tls: TlsSettings | None = Field(
        None, description="TLS settings; giving the section turns TLS on."
    )
    max_payload: int = Field(65536, ge=256, description="Largest command payload in bytes.")
    outbox_cap: int = Field(
        100_000, ge=1, description="Events and alerts kept while the broker is unreachable."
    )
    reconnect_min: float = Field(0.5, gt=0, description="First reconnect delay in seconds.")
    reconnect_max: float = Field(30.0, gt=0, description="Longest reconnect delay in seconds.")
    session_expiry: int = Field(
        7 * 24 * 3600, ge=0, le=0xFFFFFFFF, description="MQTT 5 session expiry in seconds."
    )
    reply_to_allow: list[str] = Field(
        default_factory=lambda: [],  # a lambda: see StepDefinition
        max_length=100,
        description=(
            "Topic filters under topic_prefix that replies may still be sent to (a reply_to or "
            "MQTT 5 response topic elsewhere under the prefix is refused); never opens any "
            "device's cmd, events, alerts, availability or workflows topics."
        ),
    )

    @field_validator("version", mode="before")
    @classmethod
    def _version_as_text(cls, value: Any) -> Any:
        # `version: 5` in YAML is an int; accept it as "5".
        return (
            str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value
        )

    @field_validator("topic_prefix")
    @classmethod
    def _valid_prefix(cls, value: str) -> str:
        if any(c in value for c in "+#\x00") or value.startswith("/") or value.endswith("/"):
            raise ValueError(
                "mqtt.topic_prefix must not contain '+', '#' or NUL, nor start or end with '/'."
            )
        return value

    @field_validator("reply_to_allow")
    @classmethod
    def _valid_filters(cls, value: list[str]) -> list[str]:
        for f in value:
            levels = f.split("/")
            if (
                not f
                or len(f) > 500
                or "\x00" in f
                or any(("#" in lv and lv != "#") or ("+" in lv and lv != "+") for lv in levels)
                or "#" in levels[:-1]
            ):
                raise ValueError(
                    f"mqtt.reply_to_allow: {f!r} is not a topic filter ('+' and '#' stand for "
                    "whole levels, '#' only as the last one)."
                )
        return value

    @model_validator(mode="after")
    def _backoff_order(self) -> Self:
        if self.reconnect_max < self.reconnect_min:
            raise ValueError("mqtt.reconnect_max must be at least mqtt.reconnect_min.")
        return self

    def read_password(self) -> str | None:
        """The password from ``password_file`` (stripped), or None. Blocking: call it off the loop."""
        if self.password_file is None:
            return None
        return self.password_file.read_text(encoding="utf-8").strip()


class HomeAssistantSettings(BaseModel):
    """The ``homeassistant:`` section: MQTT discovery for Home Assistant (DESIGN §12, opt-in)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        False, description="Publish the discovery configs and serve the entities' commands."
    )
    discovery_prefix: str = Field(
        "homeassistant",
        min_length=1,
        max_length=100,
        pattern=r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*$",
        description="Home Assistant's discovery prefix; its birth message is <prefix>/status.",
    )
    expose: list[str] = Field(
        default_factory=lambda: [],  # a lambda: see StepDefinition
        max_length=100,
        description="Workflow types that get a start button and a status sensor.",
    )
    start_data: dict[str, dict[str, Any]] = Field(
        default_factory=lambda: {},
        description="Per workflow type, the initial data its start button starts it with.",
    )

    @model_validator(mode="after")
    def _start_data_exposed(self) -> Self:
        extra = sorted(set(self.start_data) - set(self.expose))
        if extra:
            raise ValueError(
                f"homeassistant.start_data names {', '.join(extra)}, which homeassistant.expose "
                "does not list; add it to expose or remove its start_data."
            )
        return self


class AgentConfig(BaseModel):
    """Everything ``edgesaga run`` needs; see docs/configuration.md for every key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device_id: str = Field(
        default_factory=lambda: socket.gethostname().split(".")[0] or "edgesaga",
        pattern=r"^[A-Za-z0-9_.\-]+$",
        max_length=100,
        description=(
            "Name of this device in MQTT topics and the default client id; give each device its "
            "own."
        ),
    )
    database: Path = Field(
        Path(".edgesaga/edgesaga.db"),
        description="The SQLite file of every workflow, its journal and the MQTT outbox.",
    )
    definitions: list[Path] = Field(
        default_factory=lambda: [],  # a lambda: see StepDefinition
        description="Workflow YAML files or directories loaded besides the bundled ones.",
    )
    include_bundled: bool = Field(
        True, description="Also load the workflows shipped in the workflows package."
    )
    max_concurrent: int = Field(
        4,
        ge=1,
        le=1000,
        description="How many workflows run at the same time; others wait, ACTIVE, in a queue.",
    )
    grace_period: float = Field(
        10.0, ge=0, description="Seconds running steps get to reach a checkpoint after SIGTERM."
    )
    disk_full_grace: float = Field(
        60.0,
        ge=0,
        description=(
            "Seconds a workflow stalled by a full disk keeps its outputs before they go safe."
        ),
    )
    max_state_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        description=(
            "Largest workflow state, as UTF-8 JSON: initial data beyond it is refused, a step "
            "result beyond it fails the step (saga rules apply)."
        ),
    )
    control_socket: Path | None = Field(
        None,
        description="Unix socket the CLI talks to (default: control.sock beside the database).",
    )
    retention: RetentionSettings = Field(
        RetentionSettings(), description="When finished workflows are deleted."
    )
    logging: LoggingSettings = Field(LoggingSettings(), description="Log level and format.")
    mqtt: MqttSettings = Field(MqttSettings(enabled=False), description="The MQTT link.")
    homeassistant: HomeAssistantSettings = Field(
        HomeAssistantSettings(), description="Home Assistant MQTT discovery (needs mqtt)."
    )
    hardware: BoardConfig | None = Field(None, description="GPIO devices; null: no board.")
    yaml_limits: YamlLimits = Field(
        YamlLimits(), description="Bounds on the workflow definition files read."
    )
    python_path: list[Path] | None = Field(
        None,
        description=(
            "Directories added to sys.path before definitions load (default: the definitions "
            "directories)."
        ),
    )
    clock: ClockConfig = Field(
        ClockConfig(), description="How the agent knows its wall clock is right."
    )
    schedules: ScheduleList = Field(
        default_factory=lambda: [],  # a lambda: see StepDefinition
        description="Workflows the agent starts at the times a cron expression names (DESIGN §11).",
    )

    @field_validator("hardware")
    @classmethod
    def _open_at_safe_values(cls, value: BoardConfig | None) -> BoardConfig | None:
        # The agent opens every output at its safe value; `initial` is for a Board used elsewhere.
        return None if value is None else value.opened_at_safe_values()

    @field_validator("homeassistant")
    @classmethod
    def _homeassistant_needs_mqtt(
        cls, value: HomeAssistantSettings, info: ValidationInfo
    ) -> HomeAssistantSettings:
        # Discovery rides on the MQTT link: without it the agent would publish nothing and say
        # nothing. (An invalid mqtt section is reported on its own, first.)
        mqtt = info.data.get("mqtt")
        if value.enabled and mqtt is not None and not mqtt.enabled:
            raise ValueError(
                "homeassistant.enabled needs the MQTT link, which is off (no mqtt section, or "
                "mqtt.enabled: false); add an mqtt section naming the broker, or set "
                "homeassistant.enabled to false."
            )
        return value

    @property
    def socket_path(self) -> Path:
        return self.control_socket or self.database.parent / "control.sock"


def _set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for key in path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = node[key] = {}
        node = child
    node[path[-1]] = value


def apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """``EDGESAGA_MAX_CONCURRENT=8`` sets ``max_concurrent``; ``EDGESAGA_MQTT__HOST=broker`` sets
    ``mqtt.host`` (``__`` separates levels). Values are parsed as YAML scalars. Only variables whose
    first level is a config key count (``EDGESAGA_REAL_PINS`` and the like are not config).
    ``[a, b]`` and ``{k: v}`` values are read as YAML; ``null`` or an empty value means None."""
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == "EDGESAGA_CONFIG":
            continue
        path = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        if path[0] not in AgentConfig.model_fields:
            continue
        value: Any = raw
        if raw.strip() in ("", "null", "~"):
            value = None
        elif raw.lstrip().startswith(("[", "{")):
            # lists and mappings as YAML flow collections; scalars stay text and pydantic converts
            # them by the key's type ("8" -> 8 for max_concurrent, "0123" stays "0123" for device_id)
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError:
                value = raw
        _set_path(data, path, value)
    return data


def _sentence(msg: str) -> str:
    """A pydantic message as the middle of one sentence: without the "Value error, " pydantic
    puts before a validator's ValueError, and without its own closing period."""
    msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    return msg.rstrip().rstrip(".")


def _resolve(base: Path, p: Path | None) -> Path | None:
    if p is None:
        return None
    p = p.expanduser()
    return p if p.is_absolute() else base / p


def load_config(
    path: str | os.PathLike[str] | None, *, environ: Mapping[str, str] | None = None
) -> AgentConfig:
    """Load ``agent.yaml`` (or only defaults and environment when ``path`` is None).

    Relative paths in the file are taken relative to the file's directory."""
    env = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    base = Path.cwd()
    source = "the environment"
    if path is not None:
        p = Path(path)
        source = str(p)
        base = p.parent.resolve()
        try:
            text = read_yaml_text(p)
            loaded, _ = safe_load_yaml(text)
        except OSError as exc:
            raise ConfigError(f"Cannot read the config file {p}: {exc.strerror or exc}.") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{p}: the config file is not UTF-8 text.") from None
        except YamlRefused as exc:
            where = f"{p}:{exc.line}" if exc.line else str(p)
            raise ConfigError(f"{where}: {exc.reason}.") from None
        except yaml.YAMLError as exc:
            problem, line = yaml_problem(exc)
            where = f"{p}:{line}" if line else str(p)
            raise ConfigError(f"{where}: malformed YAML: {problem}.") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the config must be a YAML mapping of keys to values.")
        data = loaded
    data = apply_env(data, env)
    try:
        cfg = AgentConfig.model_validate(data)
    except ValidationError as exc:
        e = exc.errors()[0]
        key = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = (
            "unknown key; remove it or fix its spelling"
            if e["type"] == "extra_forbidden"
            else _sentence(e["msg"])
        )
        raise ConfigError(f"{source}: {key}: {msg}.") from None
    updates: dict[str, Any] = {
        "database": _resolve(base, cfg.database),
        "definitions": [_resolve(base, d) for d in cfg.definitions],
        "python_path": None
        if cfg.python_path is None
        else [_resolve(base, d) for d in cfg.python_path],
        "control_socket": _resolve(base, cfg.control_socket),
    }
    mqtt = cfg.mqtt
    if mqtt.password_file is not None:
        mqtt = mqtt.model_copy(update={"password_file": _resolve(base, mqtt.password_file)})
    if mqtt.tls is not None:
        tls = mqtt.tls
        mqtt = mqtt.model_copy(
            update={
                "tls": tls.model_copy(
                    update={
                        k: _resolve(base, getattr(tls, k))
                        for k in ("ca_file", "cert_file", "key_file")
                        if getattr(tls, k, None) is not None
                    }
                )
            }
        )
    updates["mqtt"] = mqtt
    sync_file = _resolve(base, Path(cfg.clock.sync_file))
    updates["clock"] = cfg.clock.model_copy(update={"sync_file": str(sync_file)})
    return cfg.model_copy(update=updates)
