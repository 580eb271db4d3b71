"""Pure core: what an LLM call cost: usage from its traffic (see `usage.py`) times a price list.

Pure: stdlib and yaml only. The price list is `rules/pricing.yaml`:

    version: 1
    as_of: "2026-11-01"
    unpriced: deny          # allow | deny: what the policy does with an unpriced model
    models:
      gpt-4o: {input: 2.50, output: 10.00, cached_input: 1.25}

Prices are USD per million tokens. `input` and `output` are required; `cached_input`
(cache reads) and `cache_write` default to `input`.
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal

import yaml

from .usage import (
    DEFAULT_MAX_OUTPUT,
    ApiKind,
    Estimate,
    Usage,
    detect_api,
    path_model,
    request_estimate,
)
from .usage_scan import StreamScanner, usage_from_json

__all__ = [
    "DEFAULT_MAX_OUTPUT",
    "ApiKind",
    "Estimate",
    "Price",
    "Pricing",
    "PricingError",
    "StreamScanner",
    "Usage",
    "detect_api",
    "load_pricing",
    "path_model",
    "request_estimate",
    "usage_from_json",
]

# A dated or tagged variant continues its base name with one of these:
# gpt-4o-2024-08-06, claude-sonnet-4-5-20250929, claude-sonnet-4-5@20250929.
# Not ".", so that gpt-5.2 is not priced as gpt-5.
_VARIANT_SEPARATORS = ("-", "@", ":")


class PricingError(ValueError):
    """A pricing file that cannot be used; the message starts with `FILE:LINE: key:`."""


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens."""

    input: float
    output: float
    cached_input: float
    cache_write: float


@dataclass(frozen=True)
class Pricing:
    """A validated price list. Model names are kept lower-case."""

    prices: Mapping[str, Price]
    unpriced: Literal["allow", "deny"]
    as_of: str
    _longest_first: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        keys = sorted(self.prices, key=len, reverse=True)
        object.__setattr__(self, "_longest_first", tuple(keys))

    def price_for(self, model: str | None) -> Price | None:
        """The price of `model`, or None when it is unpriced.

        Order: the exact name (case-insensitive), then the name without a leading
        `models/` (Gemini), then the longest listed name that the model extends with a
        `-`, `@` or `:` (so gpt-4o-2024-08-06 -> gpt-4o, gpt-4o-mini-2024-07-18 ->
        gpt-4o-mini, claude-sonnet-4-5-20250929 -> claude-sonnet-4-5).
        """
        if not model:
            return None
        name = model.strip().lower()
        if (price := self.prices.get(name)) is not None:
            return price
        name = name.removeprefix("models/")
        if (price := self.prices.get(name)) is not None:
            return price
        for key in self._longest_first:
            if name.startswith(key) and name[len(key) : len(key) + 1] in _VARIANT_SEPARATORS:
                return self.prices[key]
        return None

    def cost_usd(self, usage: Usage) -> float | None:
        """USD for `usage` at its model's price, or None when the model is unpriced.

        input x input + cached_input x cached_input + cache_write x cache_write +
        output x output, per million tokens; the caller decides what None means
        (see `unpriced`).
        """
        price = self.price_for(usage.model)
        if price is None:
            return None
        micro = (
            usage.input_tokens * price.input
            + usage.cached_input_tokens * price.cached_input
            + usage.cache_write_tokens * price.cache_write
            + usage.output_tokens * price.output
        )
        return micro / 1_000_000


_TOP_KEYS = ("version", "as_of", "unpriced", "models")
_PRICE_KEYS = ("input", "output", "cached_input", "cache_write")


def load_pricing(path: Path) -> Pricing:
    """Read and validate a pricing file.

    Raises PricingError with a `FILE:LINE: key: problem` message for an unreadable file,
    bad YAML, a missing or unknown key, a duplicate model, a wrong type, or a negative
    or non-finite price. `version` (1), `as_of` (a date) and `models` are required;
    `unpriced` defaults to deny.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        raise PricingError(f"{path}: cannot read: {reason}") from exc
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise PricingError(f"{path}:{line}: YAML syntax error: {problem}") from exc
    if root is None:
        raise PricingError(f"{path}:1: top level: empty file")
    top = _mapping(path, root, "top level", _TOP_KEYS, "")
    for required in ("version", "as_of", "models"):
        if required not in top:
            raise PricingError(f"{path}:{_line(root)}: {required}: missing required key")

    version = _scalar(top["version"])
    if version != 1 or isinstance(version, bool):
        raise _error(path, top["version"], "version", f"unsupported version {version!r} (use 1)")
    as_of = _scalar(top["as_of"])
    if isinstance(as_of, datetime.date):
        as_of = as_of.isoformat()
    if not isinstance(as_of, str) or not _is_date(as_of):
        raise _error(path, top["as_of"], "as_of", f"expected a date like 2026-11-01, got {as_of!r}")
    unpriced: object = "deny"
    if "unpriced" in top:
        unpriced = _scalar(top["unpriced"])
        if unpriced not in ("allow", "deny"):
            raise _error(
                path, top["unpriced"], "unpriced", f"expected allow or deny, got {unpriced!r}"
            )

    models_node = top["models"]
    if not isinstance(models_node, yaml.MappingNode):
        raise _error(path, models_node, "models", "expected a mapping of model names to prices")
    prices: dict[str, Price] = {}
    for key_node, value_node in models_node.value:
        name = _scalar(key_node)
        if not isinstance(name, str) or not name.strip():
            raise _error(path, key_node, f"models.{name}", "model name must be a string")
        name = name.strip().lower()
        if name in prices:
            raise _error(path, key_node, f"models.{name}", "defined twice")
        prices[name] = _price(path, value_node, f"models.{name}")
    return Pricing(
        MappingProxyType(prices),
        "allow" if unpriced == "allow" else "deny",
        as_of,
    )


def _price(path: Path, node: yaml.Node, where: str) -> Price:
    fields = _mapping(path, node, where, _PRICE_KEYS, f"{where}.")
    values: dict[str, float] = {}
    for key in _PRICE_KEYS:
        if key not in fields:
            continue
        value = _scalar(fields[key])
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _error(path, fields[key], f"{where}.{key}", f"expected a number, got {value!r}")
        if not math.isfinite(value) or value < 0:
            raise _error(path, fields[key], f"{where}.{key}", f"bad price {value!r} (use >= 0)")
        values[key] = float(value)
    for required in ("input", "output"):
        if required not in values:
            raise _error(path, node, f"{where}.{required}", "missing required key")
    return Price(
        input=values["input"],
        output=values["output"],
        cached_input=values.get("cached_input", values["input"]),
        cache_write=values.get("cache_write", values["input"]),
    )


def _mapping(
    path: Path, node: yaml.Node, where: str, allowed: tuple[str, ...], prefix: str
) -> dict[str, yaml.Node]:
    if not isinstance(node, yaml.MappingNode):
        raise _error(path, node, where, "expected a mapping")
    out: dict[str, yaml.Node] = {}
    for key_node, value_node in node.value:
        key = _scalar(key_node)
        if not isinstance(key, str) or key not in allowed:
            expected = ", ".join(sorted(allowed))
            raise _error(path, key_node, f"{prefix}{key}", f"unknown key (expected {expected})")
        if key in out:
            raise _error(path, key_node, f"{prefix}{key}", "defined twice")
        out[key] = value_node
    return out


class _Shape(str):
    """Stands in for a list or mapping where a scalar belongs; its repr reads in messages."""

    def __repr__(self) -> str:
        return f"a {self}"


def _scalar(node: yaml.Node) -> object:
    if isinstance(node, yaml.SequenceNode):
        return _Shape("list")
    if isinstance(node, yaml.MappingNode):
        return _Shape("mapping")
    return yaml.SafeLoader("").construct_object(node)


def _is_date(text: str) -> bool:
    try:
        datetime.date.fromisoformat(text)
    except ValueError:
        return False
    return True


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _error(path: Path, node: yaml.Node, key: str, problem: str) -> PricingError:
    return PricingError(f"{path}:{_line(node)}: {key}: {problem}")
