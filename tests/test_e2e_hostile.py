"""Hostile and odd input, end to end: a real `axme-fw run`, real upstreams, raw sockets.

Every case is refused or answered with a clear error, nothing it sends reaches the
upstream, the proxy keeps serving good requests afterwards, and no token appears in
the proxy's log, the audit log or the state directory.
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.rig import (
    Proxy,
    Upstream,
    agents_yaml,
    make_rules,
    start_proxy,
    start_upstream,
    upstream_ca,
)

TOKEN = "hostile-bot-token-7f3a9c"  # distinctive: searched for in every file afterwards
WRONG = "wrong-token-55e1d0b2"


@dataclass
class World:
    proxy: Proxy
    plain: Upstream
    tls: Upstream


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("hostile")
    _ca, server_ctx, ca_pem = upstream_ca(tmp)
    plain, tls = start_upstream(), start_upstream(server_ctx)
    base = f"""\
version: 1
actions:
  ok: {{hosts: ["127.0.0.1:{plain.port}", "localhost:{plain.port}"], paths: ["/ok/**"]}}
  tls: {{hosts: ["localhost:{tls.port}"], paths: ["/ok/**"]}}
"""
    rules = make_rules(
        tmp / "rules", base=base, agents=agents_yaml({"bot": (TOKEN, ["ok", "tls"])})
    )
    proxy = start_proxy(rules, tmp / "state", ca_pem)
    yield World(proxy, plain, tls)
    proxy.stop()
    plain.server.shutdown()
    tls.server.shutdown()


def auth(user: str = "bot", token: str = TOKEN) -> str:
    return "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()


def raw(proxy: Proxy, data: bytes, timeout: float = 10) -> bytes:
    """Send ``data`` to the proxy port; return its answer (see :func:`read_answer`)."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout) as s:
        s.sendall(data)
        return read_answer(s)


def read_answer(s: socket.socket) -> bytes:
    """Everything read until the peer closes or one full response (head and
    Content-Length body) has arrived."""
    out = b""
    while True:
        try:
            chunk = s.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        out += chunk
        head, sep, body = out.partition(b"\r\n\r\n")
        if sep:
            length = next(
                (
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                None,
            )
            if length is not None and len(body) >= length:
                break
    return out


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0


def reason_of(answer: bytes) -> str:
    body = answer.partition(b"\r\n\r\n")[2]
    return str(json.loads(body)["error"])


def get_line(target: str, *headers: str, method: str = "GET", authz: str | None = None) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", *headers]
    if authz is not None:
        lines.append(f"Proxy-Authorization: {authz}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


def curl(proxy: Proxy, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-s", "-o", "/dev/stdout", "-w", "\n%{http_code}", "--max-time", "10", *args],
        capture_output=True,
        text=True,
        env=proxy.env("bot", TOKEN),
        timeout=20,
    )


def code(res: subprocess.CompletedProcess[str]) -> int:
    return int(res.stdout.rsplit("\n", 1)[1])


def body(res: subprocess.CompletedProcess[str]) -> dict[str, object]:
    return dict(json.loads(res.stdout.rsplit("\n", 1)[0]))


# ---------------------------------------------------------------- paths


@pytest.mark.parametrize(
    ("path", "status", "reason", "seen"),
    [
        ("/ok/../admin", 403, "action_not_allowed", None),
        ("/ok/%2e%2e/admin", 403, "action_not_allowed", None),
        ("/ok/%2E%2E/%2e%2E/admin", 403, "path_not_canonical", None),  # climbs above root
        ("/ok/..%2fadmin", 403, "path_not_canonical", None),
        ("/ok/..%5cadmin", 403, "path_not_canonical", None),
        ("/ok/%252e%252e/admin", 403, "path_not_canonical", None),
        ("/ok/..;/admin", 403, "path_not_canonical", None),
        ("/..", 403, "path_not_canonical", None),
        ("/ok/%00", 403, "path_not_canonical", None),
        ("/ok/%zz", 403, "path_not_canonical", None),
        ("/ok/%c3%28", 403, "path_not_canonical", None),  # not UTF-8
        ("/ok/a/../b", 200, None, "/ok/b"),  # resolved, and forwarded resolved
        ("//ok//a/./b", 200, None, "/ok/a/b"),
        ("/ok/a%20b?q=/../x", 200, None, "/ok/a%20b?q=/../x"),  # as sent: already canonical
    ],
)
def test_paths_are_matched_as_the_upstream_reads_them(
    world: World, path: str, status: int, reason: str | None, seen: str | None
) -> None:
    before = len(world.plain.seen)
    answer = raw(
        world.proxy,
        get_line(
            f"http://127.0.0.1:{world.plain.port}{path}",
            f"Host: 127.0.0.1:{world.plain.port}",
            "Connection: close",
            authz=auth(),
        ),
    )
    assert status_of(answer) == status, answer[:300]
    if reason is not None:
        assert reason_of(answer) == reason
        assert len(world.plain.seen) == before  # nothing reached upstream
    else:
        assert world.plain.seen[-1].path == seen


def test_curl_path_as_is_cannot_walk_out_of_the_allow_list(world: World) -> None:
    res = curl(world.proxy, "--path-as-is", f"http://127.0.0.1:{world.plain.port}/ok/../admin")
    assert code(res) == 403 and body(res)["error"] == "action_not_allowed"
    inside = curl(
        world.proxy,
        "--path-as-is",
        f"https://localhost:{world.tls.port}/ok/%2e%2e/%2e%2e/admin",
    )
    assert code(inside) == 403 and body(inside)["error"] == "path_not_canonical"
    assert not any("admin" in s.path for s in world.plain.seen + world.tls.seen)


# ---------------------------------------------------------------- hosts


@pytest.mark.parametrize(
    ("host", "status", "reason"),
    [
        ("127.1", 403, "host_not_canonical"),
        ("2130706433", 403, "host_not_canonical"),
        ("0x7f.0.0.1", 403, "host_not_canonical"),
        ("0177.0.0.1", 403, "host_not_canonical"),
        ("[::ffff:127.0.0.1]", 403, "host_not_canonical"),
        ("LocalHost.", 200, None),  # one spelling: lower case, no trailing dot
    ],
)
def test_hosts_compare_in_one_canonical_form(
    world: World, host: str, status: int, reason: str | None
) -> None:
    before = len(world.plain.seen)
    target = f"http://{host}:{world.plain.port}/ok/h"
    answer = raw(
        world.proxy,
        get_line(target, f"Host: {host}:{world.plain.port}", "Connection: close", authz=auth()),
    )
    assert status_of(answer) == status, answer[:300]
    if reason is not None:
        assert reason_of(answer) == reason
        assert len(world.plain.seen) == before
    else:
        assert len(world.plain.seen) == before + 1


def test_host_header_that_differs_from_the_destination_is_refused(world: World) -> None:
    before = len(world.plain.seen)
    answer = raw(
        world.proxy,
        get_line(
            f"http://127.0.0.1:{world.plain.port}/ok/x",
            "Host: evil.example",
            "Connection: close",
            authz=auth(),
        ),
    )
    assert status_of(answer) == 403 and reason_of(answer) == "host_mismatch"
    two = raw(
        world.proxy,
        get_line(
            f"http://127.0.0.1:{world.plain.port}/ok/x",
            f"Host: 127.0.0.1:{world.plain.port}",
            "Host: evil.example",
            "Connection: close",
            authz=auth(),
        ),
    )
    assert status_of(two) == 403 and reason_of(two) == "host_mismatch"
    assert len(world.plain.seen) == before


def test_request_inside_a_tunnel_for_another_host_is_refused(world: World) -> None:
    before = len(world.tls.seen)
    res = curl(world.proxy, "-H", "Host: evil.example", f"https://localhost:{world.tls.port}/ok/t")
    assert code(res) == 403 and body(res)["error"] == "host_mismatch"
    assert len(world.tls.seen) == before
    good = curl(world.proxy, f"https://localhost:{world.tls.port}/ok/t")
    assert code(good) == 200 and len(world.tls.seen) == before + 1


# ---------------------------------------------------------------- framing and junk


def test_content_length_with_transfer_encoding_is_refused(world: World) -> None:
    before = len(world.plain.seen)
    req = get_line(
        f"http://127.0.0.1:{world.plain.port}/ok/smuggle",
        f"Host: 127.0.0.1:{world.plain.port}",
        "Content-Length: 5",
        "Transfer-Encoding: chunked",
        method="POST",
        authz=auth(),
    )
    answer = raw(world.proxy, req + b"0\r\n\r\n")
    # mitmproxy refuses it before any hook (validate_inbound_headers, which the firewall
    # keeps on); the firewall refuses it too if that check is ever bypassed.
    assert status_of(answer) == 400 and b"Server: mitmproxy" in answer, answer[:300]
    assert len(world.plain.seen) == before


@pytest.mark.parametrize(
    ("name", "data", "status", "decision"),
    [
        ("lower-case method", None, 403, "method_not_canonical"),
        ("bad base64 credentials", None, 407, "auth_required"),
        ("two Proxy-Authorization headers", None, 407, "auth_required"),
        ("unicode user name", None, 403, "unknown_agent"),
        ("glob user name", None, 403, "unknown_agent"),
        ("star user name", None, 403, "unknown_agent"),
        ("user name that is not UTF-8", None, 407, "auth_required"),
        ("oversized header", None, 431, "headers_too_large"),
        # Not HTTP at all: mitmproxy closes the connection without an answer.
        ("garbage request line", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" * 3, 0, None),
    ],
)
def test_junk_is_refused_and_nothing_reaches_upstream(
    world: World, name: str, data: bytes | None, status: int, decision: str | None
) -> None:
    url = f"http://127.0.0.1:{world.plain.port}/ok/junk"
    host = f"Host: 127.0.0.1:{world.plain.port}"
    cases: dict[str, bytes] = {
        "lower-case method": get_line(url, host, method="get", authz=auth()),
        "bad base64 credentials": get_line(url, host, authz="Basic !!notbase64!!"),
        "two Proxy-Authorization headers": get_line(
            url, host, f"Proxy-Authorization: {auth('bot', WRONG)}", authz=auth()
        ),
        "unicode user name": get_line(url, host, authz=auth("dëployer")),
        "glob user name": get_line(url, host, authz=auth("b*")),
        "star user name": get_line(url, host, authz=auth("*")),
        "user name that is not UTF-8": get_line(url, host)[:-2]
        + b"Proxy-Authorization: Basic "
        + base64.b64encode(b"\xff\xfe:" + TOKEN.encode())
        + b"\r\n\r\n",
        "oversized header": get_line(url, host, "X-Big: " + "a" * 300_000, authz=auth()),
    }
    before = len(world.plain.seen)
    answer = raw(world.proxy, data if data is not None else cases[name])
    assert status_of(answer) == status, (name, answer[:300])
    if decision is not None:
        assert f"X-Axme-Fw-Decision: {decision}".encode() in answer, answer[:300]
    assert len(world.plain.seen) == before
    # ... and the proxy keeps serving good requests.
    good = raw(world.proxy, get_line(url, host, "Connection: close", authz=auth()))
    assert status_of(good) == 200
    assert len(world.plain.seen) == before + 1


def test_tls_to_the_plain_port_gets_no_answer_upstream(world: World) -> None:
    # mitmproxy speaks TLS on its plain port too (it sniffs the ClientHello): that is an
    # HTTPS proxy connection, and every request inside is decided like any other.
    before = len(world.plain.seen) + len(world.tls.seen)
    ctx = ssl.create_default_context(cafile=str(world.proxy.ca))
    with (
        socket.create_connection(("127.0.0.1", world.proxy.port), timeout=10) as s,
        ctx.wrap_socket(s, server_hostname="localhost") as t,
    ):
        t.sendall(get_line("/admin", f"Host: 127.0.0.1:{world.plain.port}", authz=auth()))
        answer = read_answer(t)
    assert status_of(answer) == 403 and reason_of(answer) == "action_not_allowed"
    assert len(world.plain.seen) + len(world.tls.seen) == before
    good = raw(
        world.proxy,
        get_line(
            f"http://127.0.0.1:{world.plain.port}/ok/after-tls",
            f"Host: 127.0.0.1:{world.plain.port}",
            "Connection: close",
            authz=auth(),
        ),
    )
    assert status_of(good) == 200


def test_no_token_reaches_the_log_audit_or_state(world: World) -> None:
    # Runs last in this module: after every case above has sent TOKEN and WRONG.
    world.proxy.cli("status", "--json")
    files = [world.proxy.log, *[p for p in world.proxy.state.rglob("*") if p.is_file()]]
    assert any(p.name == "audit.jsonl" for p in files)
    for path in files:
        data = path.read_bytes()
        for secret in (TOKEN, WRONG):
            assert secret.encode() not in data, f"{secret} in {path}"
            assert base64.b64encode(f"bot:{secret}".encode()) not in data, path


def test_kept_last_so_the_module_proxy_is_still_up(world: World) -> None:
    assert world.proxy.proc.poll() is None, Path(world.proxy.log).read_text()[-2000:]
