"""Pure core: typed validation over PyYAML nodes, so every error names file, line and key.

Parsing goes through ``yaml.compose`` (not ``safe_load``): nodes keep their marks,
so a wrong value deep in a file is reported as ``FILE:LINE: dotted.key: problem``.
Errors are collected, not raised one at a time, so ``axme-fw rules check`` shows
them all at once.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import yaml

try:  # libyaml is ~10x faster on a 10,000-agent file; the pure loader is the fallback.
    from yaml import CSafeLoader as _Loader
except ImportError:  # pragma: no cover - wheels ship libyaml
    from yaml import SafeLoader as _Loader  # type: ignore[assignment]

_CONSTRUCTOR = yaml.constructor.SafeConstructor()
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


@dataclass
class Errors:
    """Collected messages, each already prefixed with ``FILE:LINE: key:``."""

    file: str
    items: list[str] = field(default_factory=list)

    def add(self, node: yaml.Node | None, key: str, problem: str) -> None:
        line = node.start_mark.line + 1 if node is not None else 1
        self.items.append(
            f"{self.file}:{line}: {key}: {problem}" if key else f"{self.file}:{line}: {problem}"
        )


def compose(text: str, errors: Errors) -> yaml.Node | None:
    """Parse ``text`` into a node tree; a syntax error is recorded with its line."""
    try:
        return yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        errors.items.append(f"{errors.file}:{line}: YAML syntax error: {exc.problem}")
    except yaml.YAMLError as exc:
        errors.items.append(f"{errors.file}:1: YAML error: {exc}")
    return None


def kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if node.tag.endswith(":null"):
        return "empty"
    return f"{node.tag.rsplit(':', 1)[-1]} {node.value!r}"


def mapping(
    node: yaml.Node, key: str, errors: Errors, allowed: frozenset[str] | None = None
) -> Iterator[tuple[str, yaml.Node, yaml.Node]]:
    """Yield ``(name, key_node, value_node)``; report non-mappings, duplicates, unknown keys."""
    if not isinstance(node, yaml.MappingNode):
        errors.add(node, key, f"expected a mapping, got {kind(node)}")
        return
    seen: set[str] = set()
    for k, v in node.value:
        name = str(k.value)
        where = f"{key}.{name}" if key else name
        if not isinstance(k, yaml.ScalarNode):
            errors.add(k, key, "keys must be plain strings")
            continue
        if name in seen:
            errors.add(k, where, "defined twice")
            continue
        seen.add(name)
        if allowed is not None and name not in allowed:
            errors.add(k, where, f"unknown key (expected one of: {', '.join(sorted(allowed))})")
            continue
        yield name, k, v


def sequence(node: yaml.Node, key: str, errors: Errors) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    errors.add(node, key, f"expected a list, got {kind(node)}")
    return []


def string(node: yaml.Node, key: str, errors: Errors, *, raw: bool = False) -> str | None:
    """A string scalar; with ``raw``, any non-null scalar's text (a digest may look numeric)."""
    if isinstance(node, yaml.ScalarNode) and (
        node.tag.endswith(":str") or (raw and not node.tag.endswith((":null", ":bool")))
    ):
        return str(node.value)
    errors.add(node, key, f"expected a string, got {kind(node)}")
    return None


def strings(node: yaml.Node, key: str, errors: Errors) -> tuple[str, ...]:
    out = []
    for i, item in enumerate(sequence(node, key, errors)):
        s = string(item, f"{key}[{i}]", errors)
        if s is not None:
            out.append(s)
    return tuple(out)


def choice(node: yaml.Node, key: str, errors: Errors, options: tuple[str, ...]) -> str | None:
    s = string(node, key, errors)
    if s is not None and s not in options:
        errors.add(node, key, f"must be one of {' | '.join(options)}, got {s!r}")
        return None
    return s


def number(node: yaml.Node, key: str, errors: Errors, *, positive: bool = True) -> float | None:
    if isinstance(node, yaml.ScalarNode) and node.tag.endswith((":int", ":float")):
        # YAML's own reading (0x10, 0o17, 1_000, 1:30, .inf); float() alone raises on some.
        if node.tag.endswith(":int"):
            value = float(_CONSTRUCTOR.construct_yaml_int(node))
        else:
            value = float(_CONSTRUCTOR.construct_yaml_float(node))
        if not math.isfinite(value):
            errors.add(node, key, f"expected a finite number, got {node.value}")
            return None
        if positive and not value > 0:
            errors.add(node, key, f"must be greater than 0, got {node.value}")
            return None
        return value
    errors.add(node, key, f"expected a number, got {kind(node)}")
    return None


def fraction(node: yaml.Node, key: str, errors: Errors) -> float | None:
    value = number(node, key, errors)
    if value is not None and value > 1:
        errors.add(node, key, f"must be a fraction between 0 and 1, got {node.value}")
        return None
    return value


def parse_duration(text: str) -> float | None:
    """``30s``, ``5m``, ``1h``, ``1d`` (also ``ms``) → seconds; None when not a duration."""
    match = _DURATION.match(text)
    return float(match.group(1)) * _UNITS[match.group(2)] if match else None


def duration(node: yaml.Node, key: str, errors: Errors) -> float | None:
    """A positive duration (see :func:`parse_duration`), else an error at the node."""
    raw = node.value if isinstance(node, yaml.ScalarNode) else None
    seconds = parse_duration(str(raw)) if raw is not None else None
    if seconds is None or seconds <= 0:
        shown = repr(raw) if raw is not None else kind(node)
        errors.add(node, key, f"bad duration {shown} (use 30s, 5m, 1h, 1d)")
        return None
    return seconds


def format_duration(seconds: float) -> str:
    """The inverse of :func:`duration` for display: 21600 → ``6h``."""
    for unit in ("d", "h", "m", "s"):
        size = _UNITS[unit]
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
