"""CLI: the probes of ``axme-fw doctor`` (sockets, subprocesses, TLS) and :func:`run`,
which runs the checks of :mod:`axme_fw.doctor` in order."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from .doctor import (
    CONTROL_HOST,
    Check,
    Proxy,
    Reply,
    check_direct,
    check_identity,
    check_no_proxy,
    check_node,
    check_proxy_vars,
    check_tls,
)

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
