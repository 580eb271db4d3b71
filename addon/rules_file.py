"""Pure core: one rules file's text → what it contributes (:class:`FilePart`), not yet merged.

An unknown key, a wrong type or a bad duration is an error naming ``FILE:LINE: key``,
collected in ``FilePart.errors`` rather than raised; names that other files may define
(actions) are checked by :func:`axme_fw.rules.merge`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import yamlnodes as y
from .ruleset import (
    ALERT_EVENTS,
    ON_EXCEED,
    ROLES,
    Action,
    Agent,
    Alert,
    Kill,
    Limit,
    Operator,
    make_action,
)

EMPTY_FILE = (
    "empty file: a rules file holds at least one key (to remove its rules, delete the file)"
)


@dataclass
class FilePart:
    """What one file contributes, before merging; ``errors`` non-empty means invalid."""

    errors: list[str]
    defaults: dict[str, tuple[object, str, str]] = field(default_factory=dict)  # value, where, key
    actions: dict[str, tuple[Action, str]] = field(default_factory=dict)
    invalid_actions: set[str] = field(default_factory=set)  # defined, but already reported
    agents: dict[str, tuple[Agent, yaml.Node, str]] = field(default_factory=dict)
    operators: dict[str, Operator] = field(default_factory=dict)
    kills: list[Kill] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    kill_revision: int = 0
    digest: bytes = b""  # SHA-256 of the file's bytes, folded into Ruleset.digest


_TOP = frozenset(
    {"version", "defaults", "alerts", "actions", "agents", "operators", "kills", "revision"}
)
_OPERATOR = frozenset({"role", "token_sha256"})
_DEFAULTS = frozenset({"unknown_agents", "mode", "park", "audit", "heartbeat", "store"})
_ACTION = frozenset({"hosts", "methods", "paths"})
_AGENT = frozenset({"token_sha256", "allow", "addresses", "limits", "heartbeat"})
_LIMITS = frozenset({"requests", "cost_usd", "actions"})
_LIMIT = frozenset({"max", "per", "on_exceed", "warn_at"})
_KILL = frozenset({"agent", "mode", "reason", "by", "at"})
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def parse_file(path: Path, text: str, shown: str) -> FilePart:
    errors = y.Errors(shown)
    part = FilePart(errors.items, digest=hashlib.sha256(text.encode()).digest())
    root = y.compose(text, errors) if text.strip() else None
    if errors.items:
        return part
    if root is None or (isinstance(root, yaml.ScalarNode) and root.tag.endswith(":null")):
        # Never "a file with no rules": an in-place save (truncate, then write) or a stray
        # `> agents.yaml` would otherwise make every agent in it unknown. Deleting the
        # file is how its rules are removed.
        errors.add(None, "", EMPTY_FILE)
        return part
    for name, _knode, value in y.mapping(root, "", errors, _TOP):
        if name == "version":
            if not (isinstance(value, yaml.ScalarNode) and value.value == "1"):
                shown_v = repr(value.value) if isinstance(value, yaml.ScalarNode) else y.kind(value)
                errors.add(value, "version", f"unsupported version {shown_v} (expected 1)")
        elif name == "revision":
            rev = y.number(value, "revision", errors, positive=False)
            part.kill_revision = int(rev) if rev is not None else 0
        elif name == "defaults":
            _parse_defaults(value, errors, part, shown)
        elif name == "actions":
            for aname, ak, av in y.mapping(value, "actions", errors):
                action = _parse_action(aname, av, errors)
                if action is not None:
                    part.actions[aname] = (action, f"{shown}:{ak.start_mark.line + 1}")
                else:
                    part.invalid_actions.add(aname)
        elif name == "agents":
            for gname, gk, gv in y.mapping(value, "agents", errors):
                agent = _parse_agent(gname, gv, errors, f"{shown}:{gk.start_mark.line + 1}")
                if agent is not None:
                    part.agents[gname] = (agent, gv, agent.where)
        elif name == "operators":
            for oname, ok, ov in y.mapping(value, "operators", errors):
                op = _parse_operator(oname, ov, errors, f"{shown}:{ok.start_mark.line + 1}")
                if op is not None:
                    part.operators[oname] = op
        elif name == "kills":
            for i, kv in enumerate(y.sequence(value, "kills", errors)):
                kill = _parse_kill(kv, f"kills[{i}]", errors)
                if kill is not None:
                    part.kills.append(kill)
        elif name == "alerts":
            for i, av in enumerate(y.sequence(value, "alerts", errors)):
                alert = _parse_alert(av, f"alerts[{i}]", errors)
                if alert is not None:
                    part.alerts.append(alert)
    return part


def _parse_defaults(node: yaml.Node, errors: y.Errors, part: FilePart, shown: str) -> None:
    def put(key: str, value: object, n: yaml.Node, shown_key: str) -> None:
        part.defaults[key] = (value, f"{shown}:{n.start_mark.line + 1}", shown_key)

    for name, _k, v in y.mapping(node, "defaults", errors, _DEFAULTS):
        key = f"defaults.{name}"
        if name == "unknown_agents":
            if (s := y.choice(v, key, errors, ("deny", "allow"))) is not None:
                put(name, s, v, key)
        elif name == "mode":
            if (s := y.choice(v, key, errors, ("enforce", "report"))) is not None:
                put(name, s, v, key)
        elif name == "park":
            for pname, _pk, pv in y.mapping(
                v, key, errors, frozenset({"timeout", "max_per_agent"})
            ):
                if pname == "timeout" and (d := y.duration(pv, f"{key}.timeout", errors)):
                    put("park_timeout", d, pv, f"{key}.timeout")
                elif pname == "max_per_agent":
                    n = y.number(pv, f"{key}.max_per_agent", errors)
                    if n is not None:
                        put("park_max_per_agent", int(n), pv, f"{key}.max_per_agent")
        elif name == "audit":
            for aname, _ak, av in y.mapping(v, key, errors, frozenset({"decisions"})):
                s = y.choice(av, f"{key}.{aname}", errors, ("all", "denied", "none"))
                if s is not None:
                    put("audit_decisions", s, av, f"{key}.{aname}")
        elif name == "store":
            for sname, _sk, sv in y.mapping(v, key, errors, frozenset({"on_unavailable"})):
                s = y.choice(sv, f"{key}.{sname}", errors, ("refuse", "local"))
                if s is not None:
                    put("store_on_unavailable", s, sv, f"{key}.{sname}")
        elif name == "heartbeat":
            for hname, _hk, hv in y.mapping(v, key, errors, frozenset({"stale_after"})):
                if (d := y.duration(hv, f"{key}.{hname}", errors)) is not None:
                    put("stale_after", d, hv, f"{key}.{hname}")


def _parse_action(name: str, node: yaml.Node, errors: y.Errors) -> Action | None:
    key = f"actions.{name}"
    hosts: tuple[str, ...] = ()
    methods: tuple[str, ...] | None = None
    paths: tuple[str, ...] = ()
    before = len(errors.items)
    for field_name, _k, v in y.mapping(node, key, errors, _ACTION):
        values = y.strings(v, f"{key}.{field_name}", errors)
        if field_name == "hosts":
            hosts = values
        elif field_name == "methods":
            methods = values
        else:
            for i, p in enumerate(values):
                if not p.startswith("/"):
                    errors.add(v, f"{key}.paths[{i}]", f"must start with '/', got {p!r}")
            paths = values
    if not hosts and isinstance(node, yaml.MappingNode):
        errors.add(node, f"{key}.hosts", "required (a list of host names or globs)")
    if len(errors.items) > before:
        return None
    return make_action(name, hosts, methods, paths)


def _parse_limit(node: yaml.Node, key: str, errors: y.Errors, *, cost: bool) -> Limit | None:
    values: dict[str, object] = {}
    allowed = _LIMIT if cost else _LIMIT - {"warn_at"}
    before = len(errors.items)
    for name, _k, v in y.mapping(node, key, errors, allowed):
        sub = f"{key}.{name}"
        if name == "max":
            values[name] = y.number(v, sub, errors)
        elif name == "per":
            values[name] = y.duration(v, sub, errors)
        elif name == "on_exceed":
            values[name] = y.choice(v, sub, errors, ON_EXCEED)
        else:
            values[name] = y.fraction(v, sub, errors)
    for required in ("max", "per"):
        if required not in values and isinstance(node, yaml.MappingNode):
            errors.add(node, f"{key}.{required}", "required")
    # No default: silently killing (or merely throttling) an agent is a choice to write down.
    if "on_exceed" not in values and isinstance(node, yaml.MappingNode):
        errors.add(node, f"{key}.on_exceed", f"required ({' | '.join(ON_EXCEED)})")
    if len(errors.items) > before:
        return None
    short = key.split(".limits.", 1)[1]
    return Limit(
        short,
        float(values["max"]),  # type: ignore[arg-type]
        float(values["per"]),  # type: ignore[arg-type]
        values["on_exceed"],  # type: ignore[arg-type]
        values.get("warn_at"),  # type: ignore[arg-type]
    )


def _token(v: yaml.Node, key: str, errors: y.Errors, command: str) -> str:
    token = (y.string(v, key, errors, raw=True) or "").lower()
    if token and not _HEX64.match(token):
        errors.add(v, key, f"must be 64 hex characters (printed by `{command}`)")
    return token


def _parse_operator(name: str, node: yaml.Node, errors: y.Errors, where: str) -> Operator | None:
    key = f"operators.{name}"
    before = len(errors.items)
    role = token = ""
    for field_name, _k, v in y.mapping(node, key, errors, _OPERATOR):
        sub = f"{key}.{field_name}"
        if field_name == "role":
            role = y.string(v, sub, errors) or ""
            if role and role not in ROLES:
                errors.add(v, sub, f"unknown role {role!r} (use {' or '.join(ROLES)})")
        else:
            token = _token(v, sub, errors, "axme-fw operator add")
    if isinstance(node, yaml.MappingNode) and len(errors.items) == before:
        for missing, value in (("role", role), ("token_sha256", token)):
            if not value:
                errors.add(node, f"{key}.{missing}", "required (run `axme-fw operator add NAME`)")
    if len(errors.items) > before or not _NAME.fullmatch(name):
        if len(errors.items) == before:
            errors.add(node, key, "use letters, digits, '.', '_' and '-'")
        return None
    return Operator(name, role, token, where)


def _parse_agent(name: str, node: yaml.Node, errors: y.Errors, where: str) -> Agent | None:
    key = f"agents.{name}"
    before = len(errors.items)
    token = ""
    allow: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()
    limits: list[Limit] = []
    stale_after = 0.0
    for field_name, _k, v in y.mapping(node, key, errors, _AGENT):
        sub = f"{key}.{field_name}"
        if field_name == "token_sha256":
            token = _token(v, sub, errors, "axme-fw agent add")
        elif field_name == "allow":
            allow = y.strings(v, sub, errors)
        elif field_name == "addresses":
            addresses = y.strings(v, sub, errors)
        elif field_name == "heartbeat":
            for hname, _hk, hv in y.mapping(v, sub, errors, frozenset({"stale_after"})):
                stale_after = y.duration(hv, f"{sub}.{hname}", errors) or 0.0
        else:
            for lname, _lk, lv in y.mapping(v, sub, errors, _LIMITS):
                lkey = f"{sub}.{lname}"
                if lname == "actions":
                    for aname, _ak, av in y.mapping(lv, lkey, errors):
                        lim = _parse_limit(av, f"{lkey}.{aname}", errors, cost=False)
                        if lim is not None:
                            limits.append(lim)
                else:
                    lim = _parse_limit(lv, lkey, errors, cost=lname == "cost_usd")
                    if lim is not None:
                        limits.append(lim)
    if not token and isinstance(node, yaml.MappingNode) and len(errors.items) == before:
        errors.add(node, f"{key}.token_sha256", "required (run `axme-fw agent add NAME`)")
    if len(errors.items) > before:
        return None
    return Agent(name, token, allow, addresses, tuple(limits), stale_after, where)


def _parse_kill(node: yaml.Node, key: str, errors: y.Errors) -> Kill | None:
    values: dict[str, str] = {}
    before = len(errors.items)
    for name, _k, v in y.mapping(node, key, errors, _KILL):
        if name == "mode":
            s = y.choice(v, f"{key}.mode", errors, ("block", "park"))
        else:
            s = y.string(v, f"{key}.{name}", errors, raw=True)
        if s is not None:
            values[name] = s
    if "agent" not in values and isinstance(node, yaml.MappingNode):
        errors.add(node, f"{key}.agent", "required")
    if len(errors.items) > before:
        return None
    return Kill(
        values["agent"],
        values.get("mode", "block"),  # type: ignore[arg-type]
        values.get("reason", ""),
        values.get("by", "unknown"),
        values.get("at", ""),
    )


def _parse_alert(node: yaml.Node, key: str, errors: y.Errors) -> Alert | None:
    webhook, events = "", ALERT_EVENTS
    before = len(errors.items)
    for name, _k, v in y.mapping(node, key, errors, frozenset({"webhook", "events"})):
        if name == "webhook":
            webhook = y.string(v, f"{key}.webhook", errors) or ""
            if webhook and not webhook.startswith(("http://", "https://")):
                errors.add(v, f"{key}.webhook", f"must be an http(s) URL, got {webhook!r}")
        else:
            listed = y.strings(v, f"{key}.events", errors)
            for i, ev in enumerate(listed):
                if ev not in ALERT_EVENTS:
                    known = ", ".join(sorted(ALERT_EVENTS))
                    errors.add(v, f"{key}.events[{i}]", f"unknown event {ev!r} (known: {known})")
            events = frozenset(listed)
    if not webhook and isinstance(node, yaml.MappingNode) and len(errors.items) == before:
        errors.add(node, f"{key}.webhook", "required")
    if len(errors.items) > before:
        return None
    return Alert(webhook, events)
