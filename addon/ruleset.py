"""Pure core: the rules model, frozen: a :class:`Ruleset` of actions, agents, kills and alerts.

Values only: built by :mod:`axme_fw.rules_file` (one file) and :mod:`axme_fw.rules` (the
directory, merged), or directly in tests and by :mod:`axme_fw.snapshot`. No I/O.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

DEFAULT_STALE_AFTER = 300.0
ON_EXCEED = ("kill", "park", "throttle")


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
        "store.down",  # a replica lost Redis (one alert per replica: each has its own link)
        "store.up",
        "store.restored",  # Redis came back empty: a replica put the kill list back
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
    store_on_unavailable: Literal["refuse", "local"] = "refuse"


ROLES = ("viewer", "operator")


@dataclass(frozen=True, slots=True)
class Operator:
    """A person or tool that may call the admin API: ``viewer`` reads (status, audit,
    metrics); ``operator`` also kills, pauses and resumes."""

    name: str
    role: str  # one of ROLES
    token_sha256: str
    where: str = ""

    def may(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


@dataclass(frozen=True)
class Ruleset:
    defaults: Defaults
    actions: Mapping[str, Action]
    agents: Mapping[str, Agent]
    kills: tuple[Kill, ...]
    alerts: tuple[Alert, ...]
    kill_revision: int
    digest: str  # SHA-256 over each file's name and SHA-256, for the audit log
    operators: Mapping[str, Operator] = field(default_factory=dict)
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

    def kills_for(self, agent: str) -> tuple[Kill, ...]:
        """Every kill entry matching ``agent``, exact names and globs alike."""
        globbed = tuple(kill for pat, kill in self._kill_globs if pat.match(agent))
        return (*(k for k in self.kills if k.agent == agent), *globbed)

    def agent_at(self, host: str, port: int) -> str | None:
        """The agent whose ``addresses`` include ``host:port`` (or bare ``host``)."""
        if not self._addresses:
            return None
        host = host.lower()
        return self._addresses.get(f"{host}:{port}") or self._addresses.get(host)


EMPTY = Ruleset(Defaults(), {}, {}, (), (), 0, hashlib.sha256(b"").hexdigest())


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def is_pattern(name: str) -> bool:
    """Whether a kill-list ``agent`` is a glob (``deploy-*``, ``*``) rather than a name."""
    return any(c in name for c in "*?[")
