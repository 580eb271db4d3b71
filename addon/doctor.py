"""CLI: ``axme-fw doctor``: is this process's environment really behind the firewall?

Run inside an agent's container, with the agent's environment. Each check gives pass,
fail or skip (not checkable because an earlier check failed), one line of detail and,
when it fails, one line saying how to fix it. Checks, in order:

1. proxy variables: HTTP_PROXY, HTTPS_PROXY, http_proxy, https_proxy all set, all the same
2. proxy reachable: a TCP connection to the proxy's address
3. identity: ``GET http://axme-fw.local/status`` through the proxy names the expected agent
4. Python ``ssl`` trust (SSL_CERT_FILE): the default context verifies the proxy's CA
5. Python requests trust (REQUESTS_CA_BUNDLE, else certifi): the same with that bundle
6. Node.js: absent, or new enough to honour NODE_USE_ENV_PROXY, which is set, with
   NODE_EXTRA_CA_CERTS
7. curl: present, and its request reaches the control host through the proxy
8. NO_PROXY covers no host the proxy must see (the control host; the rules' hosts when
   the rules are at hand)
9. direct connection: a TCP connection that bypasses the proxy (to ``--canary
   HOST:PORT``, else to the proxy's host on the next port) must not succeed

Nothing here prints: the CLI renders :func:`render` or :func:`as_json`. Credentials are
never part of any detail (proxy URLs are shown with the password masked).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from .ruleset import Ruleset

CONTROL_HOST = "axme-fw.local"
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")
# Node.js honours NODE_USE_ENV_PROXY for fetch() and http/https from v22.21.0 (22.x) and
# v24.5.0 (24.x); 24.0-24.4 apply it to fetch() only; 23.x and <= 22.20 ignore it.
NODE_MIN = {22: (22, 21, 0), 24: (24, 5, 0)}
NODE_FIX = "use Node >= 22.21 or >= 24.5 with NODE_USE_ENV_PROXY=1 (older Node goes direct)"

Status = Literal["pass", "fail", "skip"]


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: Status
    detail: str
    fix: str = ""


@dataclass(frozen=True, slots=True)
class Proxy:
    host: str
    port: int
    user: str | None
    password: str | None

    @property
    def shown(self) -> str:
        """The proxy URL with the password masked."""
        cred = f"{self.user}:***@" if self.user else ""
        return f"http://{cred}{self.host}:{self.port}"

    def auth_header(self) -> dict[str, str]:
        if self.user is None:
            return {}
        raw = f"{self.user}:{self.password or ''}".encode()
        return {"Proxy-Authorization": "Basic " + base64.b64encode(raw).decode()}


@dataclass(frozen=True, slots=True)
class Reply:
    """What the proxy answered for the control host, or why there is no answer."""

    status: int | None
    body: dict[str, Any] | None = None
    decision: str | None = None
    error: str | None = None


def parse_proxy(url: str) -> Proxy | None:
    """``http://user:token@host:port`` → :class:`Proxy`; None when it is not such a URL."""
    try:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        port = parts.port or 8080
    except ValueError:
        return None
    if parts.scheme != "http" or not parts.hostname:
        return None
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    return Proxy(parts.hostname, port, user, password)


# ---------------------------------------------------------------- pure checks


def check_proxy_vars(env: Mapping[str, str]) -> tuple[Check, Proxy | None]:
    values = {k: env.get(k, "") for k in PROXY_VARS}
    missing = [k for k, v in values.items() if not v]
    fix = 'eval "$(axme-fw env AGENT --proxy HOST:PORT)" sets all four'
    if len(missing) == len(PROXY_VARS):
        return Check("proxy variables", "fail", "none of " + ", ".join(PROXY_VARS), fix), None
    proxies = {k: parse_proxy(v) for k, v in values.items() if v}
    bad = [k for k, p in proxies.items() if p is None]
    if bad:
        return Check(
            "proxy variables", "fail", f"{', '.join(bad)}: not an http://HOST:PORT URL", fix
        ), None
    distinct = {p for p in proxies.values()}
    first = next(iter(proxies.values()))
    if len(distinct) > 1:
        shown = ", ".join(f"{k}={p.shown}" for k, p in proxies.items() if p)
        return Check("proxy variables", "fail", f"they differ: {shown}", fix), first
    if missing:
        why = " (curl reads only the lower-case http_proxy)" if "http_proxy" in missing else ""
        return Check("proxy variables", "fail", f"missing {', '.join(missing)}{why}", fix), first
    assert first is not None
    return Check("proxy variables", "pass", f"all four set to {first.shown}"), first


def check_identity(reply: Reply, proxy: Proxy, expected: str) -> Check:
    name = "identity"
    who = f"{expected}:TOKEN@{proxy.host}:{proxy.port}"
    if reply.status is None:
        return Check(name, "fail", f"no answer from the proxy: {reply.error}", "check the proxy")
    if reply.status == 407:
        return Check(name, "fail", "the proxy asks for credentials (407)", f"use http://{who}")
    if reply.status == 403 and reply.decision == "unknown_agent":
        return Check(
            name,
            "fail",
            f"the proxy does not accept {proxy.user!r} with this token (403 unknown_agent)",
            f"use the token printed by `axme-fw agent add {expected}` in http://{who}",
        )
    body = reply.body
    if reply.status != 200 or body is None or "agent" not in body:
        return Check(
            name,
            "fail",
            f"http://{CONTROL_HOST}/status answered {reply.status}, not axme-fw's status",
            "point the proxy variables at axme-fw (is something else listening there?)",
        )
    if body["agent"] != expected:
        return Check(
            name,
            "fail",
            f"the credentials identify {body['agent']!r}, not {expected!r}",
            f"use {expected}'s name and token in the proxy URL",
        )
    state = body.get("state")
    kill = body.get("kill") or {}
    extra = f" ({kill.get('reason') or 'no reason'}, by {kill.get('by')})" if kill else ""
    return Check(name, "pass", f"the proxy knows this agent as {expected!r}, state {state}{extra}")


def check_tls(name: str, source: str, error: str | None, fix: str) -> Check:
    if error is None:
        return Check(name, "pass", f"{source} trusts the firewall's CA")
    return Check(name, "fail", f"{source}: {error}", fix)


def parse_node_version(text: str) -> tuple[int, int, int] | None:
    m = re.match(r"v?(\d+)\.(\d+)\.(\d+)", text.strip())
    return (int(m[1]), int(m[2]), int(m[3])) if m else None


def node_honours_env_proxy(version: tuple[int, int, int]) -> bool:
    major = version[0]
    if major >= 25:
        return True
    floor = NODE_MIN.get(major)
    return floor is not None and version >= floor


def check_node(version_text: str | None, env: Mapping[str, str]) -> Check:
    name = "node.js"
    if version_text is None:
        return Check(name, "pass", "not installed (nothing to check)")
    version = parse_node_version(version_text)
    if version is None:
        return Check(name, "fail", f"unreadable `node --version`: {version_text!r}", NODE_FIX)
    shown = "v" + ".".join(map(str, version))
    if not node_honours_env_proxy(version):
        return Check(name, "fail", f"{shown} ignores NODE_USE_ENV_PROXY: it goes direct", NODE_FIX)
    if env.get("NODE_USE_ENV_PROXY") != "1":
        return Check(
            name,
            "fail",
            f"{shown}, but NODE_USE_ENV_PROXY is not 1: Node ignores the proxy variables",
            "export NODE_USE_ENV_PROXY=1",
        )
    if not env.get("NODE_EXTRA_CA_CERTS"):
        return Check(
            name,
            "fail",
            f"{shown} with NODE_USE_ENV_PROXY=1, but NODE_EXTRA_CA_CERTS is not set",
            "export NODE_EXTRA_CA_CERTS=/path/to/mitmproxy-ca-cert.pem (the firewall's CA)",
        )
    return Check(name, "pass", f"{shown} with NODE_USE_ENV_PROXY=1 and NODE_EXTRA_CA_CERTS")


def no_proxy_entries(env: Mapping[str, str]) -> list[str]:
    raw = ",".join(env.get(k, "") for k in ("NO_PROXY", "no_proxy"))
    return sorted({e.strip().lower() for e in raw.split(",") if e.strip()})


def covered_by(host: str, entry: str) -> bool:
    """Whether a NO_PROXY entry sends ``host`` direct (curl, requests and Node agree on
    these forms: ``*``, a suffix with or without a leading dot, ``host:port``)."""
    if entry == "*":
        return True
    entry = entry.lstrip("*").lstrip(".")
    if re.fullmatch(r"[^:\[\]]+:\d+", entry):
        entry = entry.rsplit(":", 1)[0]
    return host == entry or host.endswith("." + entry)


def check_no_proxy(env: Mapping[str, str], hosts: Iterable[str], from_rules: bool) -> Check:
    """``hosts`` are the hosts the proxy must see; globs ``*.x`` stand for a subdomain."""
    name = "NO_PROXY"
    entries = no_proxy_entries(env)
    wanted = sorted({h.lower() for h in hosts} | {CONTROL_HOST})
    hits = []
    for pattern in wanted:
        host = "a." + pattern[2:] if pattern.startswith("*.") else pattern
        if re.fullmatch(r"[^:\[\]]+:\d+", host):  # host:port in the rules
            host = host.rsplit(":", 1)[0]
        for entry in entries:
            if covered_by(host, entry):
                hits.append(f"{entry!r} sends {pattern} direct")
                break
    scope = "the rules' hosts" if from_rules else f"{CONTROL_HOST} (give --rules for more)"
    if hits:
        keep = [e for e in entries if not any(covered_by(h, e) for h in wanted)]
        return Check(
            name,
            "fail",
            "; ".join(hits),
            f"export NO_PROXY={','.join(keep)!r} no_proxy=$NO_PROXY (drop what the proxy must see)",
        )
    shown = ",".join(entries) or "empty"
    return Check(name, "pass", f"{shown}: covers none of {scope}")


def rule_hosts(ruleset: Ruleset, agent: str | None) -> list[str]:
    """The hosts the proxy must see for ``agent`` (every action's when unknown or "*")."""
    spec = ruleset.agents.get(agent) if agent else None
    names = spec.allow if spec is not None and "*" not in spec.allow else list(ruleset.actions)
    return [h for n in names if n in ruleset.actions for h in ruleset.actions[n].hosts]


def check_direct(results: Sequence[tuple[str, str | None]], canaries: bool) -> Check:
    """``results``: (target, error) per direct connection; error None means it connected."""
    name = "direct connection"
    through = [t for t, err in results if err is None]
    if through:
        return Check(
            name,
            "fail",
            f"connected straight to {', '.join(through)}, bypassing the proxy",
            "let this workload reach only the proxy (internal network, NetworkPolicy, netns)",
        )
    shown = "; ".join(f"{t}: {err}" for t, err in results)
    note = "" if canaries else " (only the proxy's host was tried: give --canary HOST:PORT)"
    return Check(name, "pass", f"blocked: {shown}{note}")


def failed(checks: Sequence[Check]) -> bool:
    return any(c.status == "fail" for c in checks)


MARK = {"pass": "✓", "fail": "✗", "skip": "-"}


def render(checks: Sequence[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"{MARK[c.status]} {c.name.ljust(width)}  {c.detail}")
        if c.status == "fail" and c.fix:
            lines.append(f"  {' ' * width}  fix: {c.fix}")
    bad = sum(c.status == "fail" for c in checks)
    lines.append(f"{bad} check(s) failed" if bad else "all checks passed")
    return "\n".join(lines)


def as_json(checks: Sequence[Check], agent: str | None) -> str:
    return json.dumps(
        {"ok": not failed(checks), "agent": agent, "checks": [asdict(c) for c in checks]},
        indent=2,
    )
