"""Rules: ``rules/*.yaml`` → one frozen, validated :class:`Ruleset`.

Every ``*.yaml`` in the directory is merged. The same agent or action defined in two
files, an unknown key, a wrong type, a bad duration or an action name that is not
defined are errors naming ``FILE:LINE: key``. :func:`load_dir` raises
:class:`RulesError` carrying all of them; the caller keeps its last good ruleset.

Parsing is cached per file by the SHA-256 of its bytes: every file is read on each
load (cheap), but only files whose bytes changed are parsed again, so a kill — which
rewrites only ``kill.yaml`` — does not re-parse a 10,000-agent file. (Keying on inode,
size and mtime would miss an in-place edit of the same size within one mtime tick.)
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from . import yamlnodes as y

KILL_FILE = "kill.yaml"
GENERATED_AGENTS_FILE = "agents.generated.yaml"
PRICING_FILE = "pricing.yaml"  # its own format (axme_fw.cost), not merged into the rules

DEFAULT_STALE_AFTER = 300.0
EMPTY_FILE = (
    "empty file: a rules file holds at least one key (to remove its rules, delete the file)"
)
ON_EXCEED = ("kill", "park", "throttle")


class RulesError(Exception):
    """Invalid rules; ``messages`` are each ``FILE:LINE: key: problem``."""

    def __init__(self, messages: list[str]) -> None:
        super().__init__("\n".join(messages))
        self.messages = messages


@dataclass(frozen=True, slots=True)
class Limit:
    key: str  # "requests", "cost_usd", "actions.deploy"
    max: float
    per: float
    on_exceed: Literal["kill", "park", "throttle"]
    warn_at: float | None = None


@dataclass(frozen=True, slots=True)
class Action:
    name: str
    hosts: tuple[str, ...]
    methods: frozenset[str] | None
    paths: tuple[str, ...]
    _host_re: re.Pattern[str] = field(repr=False, compare=False)
    _path_re: re.Pattern[str] | None = field(repr=False, compare=False)

    def matches_host(self, host: str, port: int) -> bool:
        host = host.lower()
        return self.matches_target(host, f"{host}:{port}")

    def matches(self, host: str, port: int, method: str, path: str) -> bool:
        """Method, then path (query string ignored, see :func:`path_glob`), then host."""
        host = host.lower()
        return self.matches_request(host, f"{host}:{port}", method, path.split("?", 1)[0])

    # The per-request path: the caller normalises once for every action it tries.

    def matches_target(self, host: str, hostport: str) -> bool:
        """``host`` lower-cased; ``hostport`` is ``host:port``."""
        return bool(self._host_re.match(host) or self._host_re.match(hostport))

    def matches_request(self, host: str, hostport: str, method: str, path: str) -> bool:
        """As :meth:`matches`, with ``host`` lower-cased and ``path`` without its query."""
        if self.methods is not None and method not in self.methods:
            return False
        if self._path_re is not None and not self._path_re.match(path):
            return False
        return self.matches_target(host, hostport)


def path_glob(pattern: str) -> str:
    """A regex (anchored at the end; use with ``re.match``) for one path glob.

    ``*`` matches within one segment (never ``/``), ``**`` matches anything including
    ``/``, ``?`` matches one character other than ``/``; everything else is literal
    (no ``[...]`` classes). So ``/v2/projects/*/services`` matches
    ``/v2/projects/p1/services`` but not ``/v2/projects/a/b/services``. Matching is
    case-sensitive, as paths are. Hosts use :mod:`fnmatch` instead (no ``/`` in a host).
    """
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            stars = len(pattern[i:]) - len(pattern[i:].lstrip("*"))
            out.append(".*" if stars > 1 else "[^/]*")
            i += stars
            continue
        out.append("[^/]" if c == "?" else re.escape(c))
        i += 1
    return rf"(?s:{''.join(out)})\Z"


def make_action(
    name: str, hosts: Iterable[str], methods: Iterable[str] | None, paths: Iterable[str]
) -> Action:
    """Hosts are case-insensitive :mod:`fnmatch` globs (``host`` or ``host:port``);
    paths are :func:`path_glob` globs; ``methods`` None means any method."""
    hosts, paths = tuple(h.lower() for h in hosts), tuple(paths)
    host_re = re.compile("|".join(fnmatch.translate(h) for h in hosts) or r"(?!)")
    path_re = re.compile("|".join(path_glob(p) for p in paths)) if paths else None
    meths = frozenset(m.upper() for m in methods) if methods is not None else None
    return Action(name, hosts, meths, paths, host_re, path_re)


@dataclass(frozen=True, slots=True)
class Agent:
    name: str
    token_sha256: str
    allow: tuple[str, ...]  # action names; "*" allows every destination
    addresses: tuple[str, ...]
    limits: tuple[Limit, ...]
    stale_after: float
    where: str  # FILE:LINE of the definition


@dataclass(frozen=True, slots=True)
class Kill:
    agent: str  # a name or a glob
    mode: Literal["block", "park"]
    reason: str
    by: str
    at: str


@dataclass(frozen=True, slots=True)
class Alert:
    webhook: str
    events: frozenset[str]


ALERT_EVENTS = frozenset(
    {
        "agent.killed",
        "agent.auto_killed",
        "agent.paused",
        "agent.resumed",
        "agent.stale",
        "agent.recovered",
        "budget.warning",
        "rules.rejected",
    }
)


@dataclass(frozen=True, slots=True)
class Defaults:
    unknown_agents: Literal["deny", "allow"] = "deny"
    mode: Literal["enforce", "report"] = "enforce"
    park_timeout: float = 600.0
    park_max_per_agent: int = 1000
    audit_decisions: Literal["all", "denied", "none"] = "denied"
    stale_after: float = DEFAULT_STALE_AFTER


@dataclass(frozen=True)
class Ruleset:
    defaults: Defaults
    actions: Mapping[str, Action]
    agents: Mapping[str, Agent]
    kills: tuple[Kill, ...]
    alerts: tuple[Alert, ...]
    kill_revision: int
    digest: str  # SHA-256 over each file's name and SHA-256, for the audit log
    _kill_exact: dict[str, Kill] = field(default_factory=dict, repr=False)
    _kill_globs: tuple[tuple[re.Pattern[str], Kill], ...] = field(default=(), repr=False)
    _addresses: dict[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for kill in self.kills:
            if is_pattern(kill.agent):
                pat = re.compile(fnmatch.translate(kill.agent))
                object.__setattr__(self, "_kill_globs", (*self._kill_globs, (pat, kill)))
            else:
                self._kill_exact.setdefault(kill.agent, kill)
        for agent in self.agents.values():
            for address in agent.addresses:
                self._addresses[address.lower()] = agent.name

    def with_kills(self, kills: tuple[Kill, ...], **changes: object) -> Ruleset:
        """A copy with another kill list (indices rebuilt; ``self`` is left untouched)."""
        return dataclasses.replace(
            self,
            kills=kills,
            _kill_exact={},
            _kill_globs=(),
            _addresses={},
            **changes,  # type: ignore[arg-type]
        )

    def kill_for(self, agent: str) -> Kill | None:
        """The first kill entry matching ``agent`` (exact names win over globs)."""
        kill = self._kill_exact.get(agent)
        if kill is not None:
            return kill
        for pat, kill in self._kill_globs:
            if pat.match(agent):
                return kill
        return None

    def agent_at(self, host: str, port: int) -> str | None:
        """The agent whose ``addresses`` include ``host:port`` (or bare ``host``)."""
        if not self._addresses:
            return None
        host = host.lower()
        return self._addresses.get(f"{host}:{port}") or self._addresses.get(host)


EMPTY = Ruleset(Defaults(), {}, {}, (), (), 0, hashlib.sha256(b"").hexdigest())


# ---------------------------------------------------------------- parsing one file


@dataclass
class _FilePart:
    """What one file contributes, before merging; ``errors`` non-empty means invalid."""

    errors: list[str]
    defaults: dict[str, tuple[object, str, str]] = field(default_factory=dict)  # value, where, key
    actions: dict[str, tuple[Action, str]] = field(default_factory=dict)
    invalid_actions: set[str] = field(default_factory=set)  # defined, but already reported
    agents: dict[str, tuple[Agent, yaml.Node, str]] = field(default_factory=dict)
    kills: list[Kill] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    kill_revision: int = 0
    digest: bytes = b""  # SHA-256 of the file's bytes, folded into Ruleset.digest


_TOP = frozenset({"version", "defaults", "alerts", "actions", "agents", "kills", "revision"})
_DEFAULTS = frozenset({"unknown_agents", "mode", "park", "audit", "heartbeat"})
_ACTION = frozenset({"hosts", "methods", "paths"})
_AGENT = frozenset({"token_sha256", "allow", "addresses", "limits", "heartbeat"})
_LIMITS = frozenset({"requests", "cost_usd", "actions"})
_LIMIT = frozenset({"max", "per", "on_exceed", "warn_at"})
_KILL = frozenset({"agent", "mode", "reason", "by", "at"})
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def parse_file(path: Path, text: str, shown: str) -> _FilePart:
    errors = y.Errors(shown)
    part = _FilePart(errors.items, digest=hashlib.sha256(text.encode()).digest())
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


def _parse_defaults(node: yaml.Node, errors: y.Errors, part: _FilePart, shown: str) -> None:
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
            token = (y.string(v, sub, errors, raw=True) or "").lower()
            if token and not _HEX64.match(token):
                errors.add(v, sub, "must be 64 hex characters (printed by `axme-fw agent add`)")
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


# ---------------------------------------------------------------- the directory


class Loader:
    """Loads a rules directory, re-parsing only files whose bytes changed since the last call."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._cache: dict[Path, tuple[bytes, _FilePart]] = {}  # path -> (SHA-256, parse)

    def load(self) -> Ruleset:
        """Parse and merge every ``*.yaml``; raise :class:`RulesError` listing every problem.

        Every file is read each time; a file is parsed again only if the SHA-256 of its
        bytes differs from the last load's, whatever its inode, size or mtime say.
        """
        if not self.directory.is_dir():
            raise RulesError([f"{self.directory}: rules directory not found"])
        parts: list[tuple[str, _FilePart]] = []
        fresh: dict[Path, tuple[bytes, _FilePart]] = {}
        for path in sorted(self.directory.glob("[!.]*.yaml")):
            if path.name == PRICING_FILE:
                continue
            try:
                raw = path.read_bytes()
                sha = hashlib.sha256(raw).digest()
                cached = self._cache.get(path)
                if cached is not None and cached[0] == sha:
                    part = cached[1]
                else:
                    # Decoded as is (no newline translation): YAML reads CRLF itself, and
                    # the part's digest is then the SHA-256 of these very bytes.
                    part = parse_file(path, raw.decode("utf-8"), str(path))
            except FileNotFoundError:
                if path.is_symlink():  # broken, not removed: never "no rules" by accident
                    raise RulesError([f"{path}:1: symlink to a missing file"]) from None
                continue  # removed between glob and read: it no longer contributes
            except (OSError, UnicodeDecodeError) as exc:
                raise RulesError([f"{path}:1: cannot read: {exc}"]) from None
            fresh[path] = (sha, part)
            parts.append((str(path), part))
        self._cache = fresh
        return merge(parts)

    def load_kills(self, current: Ruleset) -> Ruleset | None:
        """Fast path after a change to ``kill.yaml`` alone: re-read only that file.

        Returns ``current`` with the new kill list and revision, or None when a full
        :meth:`load` is needed (no previous load, or kill.yaml holds more than kills).
        Raises :class:`RulesError` when kill.yaml is invalid. A kill must not wait for
        10,000 agents to be merged again: this is O(kill list).
        """
        path = self.directory / KILL_FILE
        if not self._cache:
            return None
        try:
            raw: bytes | None = path.read_bytes()
        except FileNotFoundError:
            raw = None  # deleted: it no longer contributes (an *empty* kill.yaml is invalid)
        except OSError as exc:
            raise RulesError([f"{path}:1: cannot read: {exc}"]) from None
        try:
            part = (
                parse_file(path, raw.decode("utf-8"), str(path))
                if raw is not None
                else _FilePart([])
            )
        except UnicodeDecodeError as exc:
            raise RulesError([f"{path}:1: cannot read: {exc}"]) from None
        if part.errors:
            raise RulesError(part.errors)
        if part.defaults or part.actions or part.agents or part.alerts or part.invalid_actions:
            return None
        cache = {k: v for k, v in self._cache.items() if k != path}
        if raw is not None:
            cache[path] = (hashlib.sha256(raw).digest(), part)
        self._cache = dict(sorted(cache.items()))
        kills: list[Kill] = []
        revision = 0
        digest = hashlib.sha256()
        for p, (_sha, fp) in self._cache.items():
            digest.update(str(p).encode() + b"\0" + fp.digest + b"\0")
            kills.extend(fp.kills)
            revision = max(revision, fp.kill_revision)
        return current.with_kills(tuple(kills), kill_revision=revision, digest=digest.hexdigest())


def load_dir(directory: Path) -> Ruleset:
    return Loader(directory).load()


def merge(parts: list[tuple[str, _FilePart]]) -> Ruleset:
    errors = [e for _, p in parts for e in p.errors]
    defaults: dict[str, tuple[object, str, str]] = {}
    actions: dict[str, tuple[Action, str]] = {}
    invalid = {a for _, p in parts for a in p.invalid_actions}
    agents: dict[str, tuple[Agent, yaml.Node, str]] = {}
    kills: list[Kill] = []
    alerts: list[Alert] = []
    revision = 0
    digest = hashlib.sha256()
    for shown, part in parts:
        digest.update(shown.encode() + b"\0" + part.digest + b"\0")
        for key, (value, where, shown_key) in part.defaults.items():
            if key in defaults:
                errors.append(f"{where}: {shown_key}: already set at {defaults[key][1]}")
            defaults[key] = (value, where, shown_key)
        for name, (action, where) in part.actions.items():
            if name in actions:
                errors.append(f"{where}: actions.{name}: already defined at {actions[name][1]}")
            actions[name] = (action, where)
        for name, entry in part.agents.items():
            if name in agents:
                errors.append(f"{entry[2]}: agents.{name}: already defined at {agents[name][2]}")
            agents[name] = entry
        kills.extend(part.kills)
        alerts.extend(part.alerts)
        revision = max(revision, part.kill_revision)
    # Dangling action names, now that every file's actions are known. An action that is
    # defined but invalid has its own error already; naming it "unknown" would mislead.
    for name, (agent, node, where) in agents.items():
        file = where.rsplit(":", 1)[0]
        for a in agent.allow:
            if a != "*" and a not in actions and a not in invalid:
                at = _line_of(node, where, file, "allow", a)
                errors.append(f"{at}: agents.{name}.allow: unknown action {a!r}{_known(actions)}")
        for lim in agent.limits:
            aname = lim.key[8:]
            if lim.key.startswith("actions.") and aname not in actions and aname not in invalid:
                at = _line_of(node, where, file, "limits", "actions", aname)
                errors.append(
                    f"{at}: agents.{name}.limits.{lim.key}: unknown action "
                    f"{aname!r}{_known(actions)}"
                )
    if errors:
        raise RulesError(errors)
    d = {k: v for k, (v, _w, _k) in defaults.items()}
    return Ruleset(
        defaults=Defaults(**d),  # type: ignore[arg-type]
        actions={k: a for k, (a, _w) in actions.items()},
        agents={k: a for k, (a, _n, _w) in agents.items()},
        kills=tuple(kills),
        alerts=tuple(alerts),
        kill_revision=revision,
        digest=digest.hexdigest(),
    )


def _line_of(node: yaml.Node, fallback: str, file: str, *path: str) -> str:
    """``FILE:LINE`` of the key (or list item) at ``path`` under ``node``; else ``fallback``."""
    for i, step in enumerate(path, start=1):
        if isinstance(node, yaml.MappingNode):
            found = next(((k, v) for k, v in node.value if k.value == step), None)
            if found is None:
                return fallback
            key_node, node = found
            if i == len(path):
                return f"{file}:{key_node.start_mark.line + 1}"
        elif isinstance(node, yaml.SequenceNode):
            item = next((n for n in node.value if getattr(n, "value", None) == step), None)
            return f"{file}:{item.start_mark.line + 1}" if item is not None else fallback
        else:
            return fallback
    return fallback


def _known(actions: Mapping[str, object]) -> str:
    return f" (defined: {', '.join(sorted(actions))})" if actions else " (no actions defined)"


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def is_pattern(name: str) -> bool:
    """Whether a kill-list ``agent`` is a glob (``deploy-*``, ``*``) rather than a name."""
    return any(c in name for c in "*?[")


def atomic_write(path: Path, data: str) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync, rename over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
