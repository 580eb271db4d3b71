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
import http.client
import json
import re
import shutil
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
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


# ---------------------------------------------------------------- I/O helpers


def tcp_connect(host: str, port: int, timeout: float) -> str | None:
    """None when a TCP connection opened, else why not (refused, timed out, unreachable)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "timed out"
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def control_status(proxy: Proxy, timeout: float, tls: ssl.SSLContext | None = None) -> Reply:
    """``GET /status`` of the control host through the proxy: plain HTTP, or (``tls``) in a
    CONNECT tunnel verified with ``tls``. TLS and proxy errors come back in ``error``."""
    conn: http.client.HTTPConnection
    try:
        if tls is None:
            conn = http.client.HTTPConnection(proxy.host, proxy.port, timeout=timeout)
            conn.request("GET", f"http://{CONTROL_HOST}/status", headers=proxy.auth_header())
        else:
            conn = http.client.HTTPSConnection(proxy.host, proxy.port, timeout=timeout, context=tls)
            conn.set_tunnel(CONTROL_HOST, 443, headers=proxy.auth_header())
            conn.request("GET", "/status")
        resp = conn.getresponse()
        raw = resp.read()
        conn.close()
    except ssl.SSLCertVerificationError as exc:
        return Reply(None, error=f"certificate not trusted ({exc.verify_message})")
    except (OSError, http.client.HTTPException) as exc:
        return Reply(None, error=str(exc) or type(exc).__name__)
    body: dict[str, Any] | None = None
    try:
        parsed = json.loads(raw)
        body = parsed if isinstance(parsed, dict) else None
    except ValueError:
        pass
    return Reply(resp.status, body, resp.headers.get("X-Axme-Fw-Decision"))


def requests_bundle(env: Mapping[str, str]) -> tuple[str | None, str]:
    """The CA bundle the requests library would use: (path, where it comes from)."""
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        if env.get(var):
            return env[var], var
    try:
        import certifi
    except ImportError:
        return None, "certifi (not installed)"
    return certifi.where(), "certifi (REQUESTS_CA_BUNDLE unset)"


def node_version() -> str | None:
    node = shutil.which("node")
    if node is None:
        return None
    try:
        res = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"error: {exc}"
    return res.stdout.strip() or res.stderr.strip()


def check_curl(env: Mapping[str, str], expected: str, timeout: float) -> Check:
    name = "curl"
    curl = shutil.which("curl", path=env.get("PATH"))
    if curl is None:
        return Check(name, "fail", "not on PATH", "install curl (apt-get install curl)")
    url = f"http://{CONTROL_HOST}/status"
    try:
        res = subprocess.run(
            [curl, "-sS", "--max-time", str(timeout), url],
            capture_output=True,
            text=True,
            timeout=timeout + 5,
            env=dict(env),
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check(name, "fail", f"could not run curl: {exc}", "check the curl install")
    try:
        agent = json.loads(res.stdout).get("agent")
    except (ValueError, AttributeError):
        agent = None
    if agent == expected:
        return Check(name, "pass", f"curl {url} went through the proxy as {expected!r}")
    why = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"
    return Check(
        name,
        "fail",
        f"curl {url} did not reach the proxy as {expected!r}: {why}",
        "curl reads the lower-case http_proxy/https_proxy: export them",
    )


# ---------------------------------------------------------------- the run


def parse_hostport(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too); ValueError with a readable message."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{value!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def run(
    env: Mapping[str, str],
    agent: str | None = None,
    canaries: Sequence[tuple[str, int]] = (),
    rule_hosts: Iterable[str] | None = None,
    timeout: float = 3.0,
    node: Callable[[], str | None] = node_version,
) -> list[Check]:
    """Every check, in the order of the module docstring."""
    checks: list[Check] = []
    first, proxy = check_proxy_vars(env)
    checks.append(first)
    expected = agent or (proxy.user if proxy else None) or "?"

    def skip(name: str, why: str) -> Check:
        return Check(name, "skip", f"not checked: {why}")

    reachable = False
    if proxy is None:
        checks.append(skip("proxy reachable", "no proxy URL"))
    else:
        err = tcp_connect(proxy.host, proxy.port, timeout)
        reachable = err is None
        checks.append(
            Check("proxy reachable", "pass", f"{proxy.host}:{proxy.port} accepts connections")
            if reachable
            else Check(
                "proxy reachable",
                "fail",
                f"{proxy.host}:{proxy.port}: {err}",
                "start the firewall (axme-fw run --listen-host 0.0.0.0) or fix HOST:PORT",
            )
        )
    identified = False
    if proxy is None or not reachable:
        checks.append(skip("identity", "the proxy is not reachable"))
    else:
        ident = check_identity(control_status(proxy, timeout), proxy, expected)
        identified = ident.status == "pass"
        checks.append(ident)
    ca_fix = "export {var}=/path/to/mitmproxy-ca-cert.pem (the firewall's CA; `axme-fw env`)"
    if proxy is None or not identified:
        checks.append(skip("python ssl trust", "the proxy did not identify this agent"))
        checks.append(skip("python requests trust", "the proxy did not identify this agent"))
    else:
        where = env.get("SSL_CERT_FILE")
        source = f"ssl default context (SSL_CERT_FILE={where})" if where else "ssl default context"
        # OpenSSL reads SSL_CERT_FILE from this process's environment: run() checks the
        # process's own trust, so ``env`` is expected to be os.environ here.
        reply = control_status(proxy, timeout, ssl.create_default_context())
        checks.append(
            check_tls("python ssl trust", source, reply.error, ca_fix.format(var="SSL_CERT_FILE"))
        )
        bundle, origin = requests_bundle(env)
        if bundle is None:
            bundle_err: str | None = "no CA bundle"
        else:
            ctx = ssl.create_default_context(cafile=bundle)
            bundle_err = control_status(proxy, timeout, ctx).error
        checks.append(
            check_tls(
                "python requests trust", origin, bundle_err, ca_fix.format(var="REQUESTS_CA_BUNDLE")
            )
        )
    checks.append(check_node(node(), env))
    if proxy is None or not reachable:
        checks.append(skip("curl", "the proxy is not reachable"))
    else:
        checks.append(check_curl(env, expected, timeout))
    checks.append(check_no_proxy(env, rule_hosts or (), rule_hosts is not None))
    targets = list(canaries)
    if not targets and proxy is not None:
        targets = [(proxy.host, proxy.port + 1)]
    if targets:
        results = [(f"{h}:{p}", tcp_connect(h, p, timeout)) for h, p in targets]
        checks.append(check_direct(results, bool(canaries)))
    else:
        checks.append(skip("direct connection", "no proxy address and no --canary"))
    return checks


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
