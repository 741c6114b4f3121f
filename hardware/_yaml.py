"""Bounded YAML: every YAML file edgesaga reads (workflow definitions, the agent config, devices
files) goes through :func:`safe_load_yaml`, which refuses a file too large, an alias bomb, a tree
nested too deep and a key given twice, in one sentence, before anything is constructed.

It lives in the hardware package, the lowest layer, because both the HAL (devices files) and the
agent (definitions, config) read YAML with it; nothing here knows about either.
"""

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field


class YamlLimits(BaseModel):
    """Bounds on every YAML file edgesaga reads (``yaml_limits`` in the agent config): its size in
    bytes, its values (mapping keys, values and list items) counted once its aliases are expanded,
    and how deeply they nest. They stop an alias bomb or a runaway file before memory does."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_bytes: int = Field(1024 * 1024, ge=1, description="Largest file in bytes.")
    max_nodes: int = Field(100_000, ge=1, description="Most values once aliases are expanded.")
    max_depth: int = Field(64, ge=1, description="Deepest nesting.")


DEFAULT_YAML_LIMITS = YamlLimits()

_MERGE_TAG = "tag:yaml.org,2002:merge"


class YamlRefused(yaml.YAMLError):  # type: ignore[misc]  # PyYAML ships no type hints
    """Raised when a YAML file breaks a :class:`YamlLimits` bound or repeats a key in a mapping.

    ``reason`` is one sentence saying what is wrong and what to do, ``line`` the 1-based line and
    ``key`` the repeated key (or None)."""

    def __init__(self, reason: str, line: int | None = None, *, key: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.line = line
        self.key = key


def _check_tree(root: yaml.Node, limits: YamlLimits) -> None:
    """Count ``root``'s values as construction would see them (an alias counts again wherever it
    is used), bound their depth, and refuse a key given twice in one mapping. Iterative and
    stopped at the first bound, so an alias bomb or a self-referencing alias costs little."""
    count = 0
    keys_checked: set[int] = set()  # a mapping reached again through an alias is checked once
    stack: list[tuple[yaml.Node, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        line = node.start_mark.line + 1
        if count > limits.max_nodes:
            raise YamlRefused(
                f"the YAML has more than {limits.max_nodes} values once its aliases are expanded; "
                "shorten it (an anchor used over and over multiplies its values) or raise "
                "yaml_limits.max_nodes in the agent config",
                line,
            )
        if depth > limits.max_depth:
            raise YamlRefused(
                f"the YAML is nested more than {limits.max_depth} levels deep (or an alias refers "
                "to a mapping or list that contains it); flatten it or raise "
                "yaml_limits.max_depth in the agent config",
                line,
            )
        if isinstance(node, yaml.MappingNode):
            if id(node) not in keys_checked:
                keys_checked.add(id(node))
                _refuse_duplicate_keys(node)
            for key, value in node.value:
                stack.append((value, depth + 1))
                stack.append((key, depth + 1))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, depth + 1) for item in node.value)


def _refuse_duplicate_keys(node: yaml.MappingNode) -> None:
    seen: dict[tuple[str, str], int] = {}
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.tag == _MERGE_TAG:
            continue  # `<<: *base` may be overridden by the keys beside it: that is what it is for
        line = key.start_mark.line + 1
        first = seen.get((key.tag, key.value))
        if first is not None:
            where = f"on line {line}" if first == line else f"on lines {first} and {line}"
            raise YamlRefused(
                f"key {key.value!r} is given twice, {where}; a key may appear once in a mapping "
                "(YAML would silently keep the last one), so remove one",
                line,
                key=key.value,
            )
        seen[(key.tag, key.value)] = line


def read_yaml_text(path: Path, limits: YamlLimits = DEFAULT_YAML_LIMITS) -> str:
    """The text of ``path``, refused with :class:`YamlRefused` once it is longer than
    ``limits.max_bytes`` (read no further than that). Raises OSError and UnicodeDecodeError."""
    with path.open("rb") as fh:
        data = fh.read(limits.max_bytes + 1)
    if len(data) > limits.max_bytes:
        raise YamlRefused(
            f"the file is larger than {limits.max_bytes} bytes; split it, or raise "
            "yaml_limits.max_bytes in the agent config"
        )
    return data.decode("utf-8")


# libyaml's parser when PyYAML was built with it (the wheels are): ~10x faster than the pure-Python
# one, which took a sizeable share of `edgesaga run`'s start-up. Construction and tag resolution are
# PyYAML's Python code either way, so both give the same data and the same node lines.
_FAST_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def safe_load_yaml(
    text: str, *, compose: bool = False, limits: YamlLimits = DEFAULT_YAML_LIMITS
) -> tuple[Any, yaml.Node | None]:
    """``yaml.safe_load(text)`` and, with ``compose``, ``yaml.compose(text)`` (the node tree that
    the definitions loader reads for error lines), parsed by libyaml when available.

    The node tree is checked against ``limits`` and for keys given twice before anything is
    constructed (:class:`YamlRefused`). Text libyaml rejects is parsed again by the pure-Python
    loader, so an error (its message and its line) reads exactly as PyYAML's own, and whatever
    PyYAML accepts is still accepted."""
    if len(text) > limits.max_bytes:  # characters: at most as many as bytes
        raise YamlRefused(
            f"the YAML is larger than {limits.max_bytes} bytes; split it, or raise "
            "yaml_limits.max_bytes in the agent config"
        )
    try:
        try:
            return _parse_yaml(text, _FAST_LOADER, compose=compose, limits=limits)
        except YamlRefused:
            raise
        except yaml.YAMLError:
            if _FAST_LOADER is yaml.SafeLoader:
                raise
        return _parse_yaml(text, yaml.SafeLoader, compose=compose, limits=limits)
    except yaml.reader.ReaderError as exc:  # its text spans lines and it has no mark: say it here
        line = text.count("\n", 0, exc.position) + 1
        raise YamlRefused(
            f"the YAML holds a character it does not allow (#x{exc.character:04x}: {exc.reason}); "
            "remove it",
            line,
        ) from None


def yaml_problem(exc: yaml.YAMLError) -> tuple[str, int | None]:
    """PyYAML's problem in one line (its messages may span several) and its 1-based line."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    return " ".join(str(problem).split()), mark.line + 1 if mark else None


def _parse_yaml(
    text: str, loader_class: Any, *, compose: bool, limits: YamlLimits
) -> tuple[Any, yaml.Node | None]:
    # One parse for both: the data is constructed from the node tree, as yaml.load does inside.
    loader = loader_class(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _check_tree(node, limits)
        try:
            data = None if node is None else loader.construct_document(node)
        except (ValueError, TypeError, OverflowError) as exc:
            # PyYAML's constructors let a few Python errors through (an integer of 5000 digits
            # exceeds int()'s limit, a date out of range, ...)
            raise yaml.constructor.ConstructorError(
                problem=f"a value cannot be read ({exc})"
            ) from exc
    finally:
        loader.dispose()
    return data, node if compose else None
