"""End to end: a kill reaches work already in progress; park and release in order; inbound."""

from __future__ import annotations

import base64
import json
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect
from websockets.sync.server import ServerConnection
from websockets.sync.server import serve as ws_serve

from tests.rig import (
    Proxy,
    Upstream,
    agents_yaml,
    iter_jsonl,
    start_proxy,
    start_upstream,
    upstream_ca,
    wait_for,
)

DEPLOYER, DTOKEN = "deployer", "tok-d"
CODER, CTOKEN = "coder", "tok-c"
HERE = Path(__file__).parent


def base_yaml(park: str = "{timeout: 10m, max_per_agent: 1000}") -> str:
    return f"""\
version: 1
defaults:
  park: {park}
  audit: {{decisions: denied}}
actions:
  local: {{hosts: ["127.0.0.1"]}}
"""


@dataclass
class World:
    proxy: Proxy
    plain: Upstream
    tls: Upstream
    ordered: Upstream
    inbound: Upstream
    ticker_port: int
    ws_port: int
    client_ctx: ssl.SSLContext  # trusts the upstream CA (for the passthrough tunnel)


def ticker(server_ctx: ssl.SSLContext) -> int:
    """A TLS server that, once a client says something, sends a tick every 50 ms."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)

    def serve_one(conn: socket.socket) -> None:
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(100)
                for i in range(400):
                    tls.sendall(f"tick {i}\n".encode())
                    time.sleep(0.05)
        except OSError:
            pass

    def accept() -> None:
        while True:
            conn, _ = sock.accept()
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return int(sock.getsockname()[1])


def ws_server() -> int:
    def handler(ws: ServerConnection) -> None:
        try:
            for i in range(400):
                ws.send(f"event {i}")
                time.sleep(0.05)
        except ConnectionClosed:
            pass

    server = ws_serve(handler, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return int(server.socket.getsockname()[1])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("inflight")
    ca, server_ctx, ca_pem = upstream_ca(tmp)
    plain, tls = start_upstream(), start_upstream(server_ctx)
    ordered, inbound = start_upstream(ordered=True), start_upstream()
    tick_port, ws_port = ticker(server_ctx), ws_server()
    rules = tmp / "rules"
    rules.mkdir()
    (rules / "base.yaml").write_text(base_yaml())
    more = f'addresses: ["127.0.0.1:{inbound.port}"]'
    agents = {DEPLOYER: (DTOKEN, ["local"]), CODER: (CTOKEN, ["local"])}
    (rules / "agents.yaml").write_text(agents_yaml(agents, deployer=more))
    ignore = rf"^127\.0\.0\.1:{tick_port}$"
    proxy = start_proxy(rules, tmp / "state", ca_pem, "--set", f"ignore_hosts={ignore}")
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    yield World(proxy, plain, tls, ordered, inbound, tick_port, ws_port, client_ctx)
    plain.release.set()
    tls.release.set()
    proxy.stop()


@pytest.fixture
def resume_after(world: World) -> Iterator[None]:
    yield
    world.proxy.cli("resume", DEPLOYER, check=False)


def read_stream(s: requests.Session, url: str, events: list[float], done: threading.Event) -> None:
    try:
        with s.get(url, stream=True, timeout=30) as r:
            for line in r.iter_lines():
                if line:
                    events.append(time.monotonic())
    except requests.RequestException:
        pass
    finally:
        done.set()


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_kill_cuts_an_sse_stream_but_not_another_agents(
    world: World, scheme: str, resume_after
) -> None:
    up = world.plain if scheme == "http" else world.tls
    mine: list[float] = []
    theirs: list[float] = []
    mine_done, theirs_done = threading.Event(), threading.Event()
    for sess, ev, done in (
        (world.proxy.session(DEPLOYER, DTOKEN), mine, mine_done),
        (world.proxy.session(CODER, CTOKEN), theirs, theirs_done),
    ):
        threading.Thread(
            target=read_stream, args=(sess, f"{up.url}/sse", ev, done), daemon=True
        ).start()
    wait_for(lambda: len(mine) >= 3 and len(theirs) >= 3, 10, "both streams flowing")

    t_kill = time.monotonic()
    world.proxy.cli("kill", DEPLOYER, "--reason", "cut streams")
    assert mine_done.wait(1.0), "the killed agent's stream was not cut within 1 s of the kill"
    assert mine_done.is_set()
    n = len(theirs)
    wait_for(lambda: len(theirs) >= n + 3, 5, "the other agent's stream to go on")
    assert not theirs_done.is_set()
    assert all(t < t_kill + 1.0 for t in mine)
    cut = [r for r in world.proxy.audit_events("kill.enforced") if r["agent"] == DEPLOYER]
    assert cut and cut[-1]["flows_cut"] >= 1 and cut[-1]["connections_cut"] >= 1


def test_kill_closes_a_websocket(world: World, resume_after) -> None:
    url = world.proxy.url(DEPLOYER, DTOKEN)
    with ws_connect(f"ws://127.0.0.1:{world.ws_port}/", proxy=url, open_timeout=10) as ws:
        first = ws.recv(timeout=5)
        assert isinstance(first, str) and first.startswith("event")
        world.proxy.cli("kill", DEPLOYER, "--reason", "ws")
        deadline = time.monotonic() + 1.0
        with pytest.raises(ConnectionClosed):
            while time.monotonic() < deadline:
                ws.recv(timeout=max(0.01, deadline - time.monotonic()))
        assert time.monotonic() < deadline + 0.05


def open_tunnel(world: World, agent: str, token: str, port: int) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", world.proxy.port), timeout=5)
    cred = base64.b64encode(f"{agent}:{token}".encode()).decode()
    raw.sendall(
        f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Proxy-Authorization: Basic {cred}\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += raw.recv(1)
    assert head.startswith(b"HTTP/1.1 200"), head
    tls = world.client_ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    tls.sendall(b"hello")
    return tls


def test_kill_closes_a_passed_through_tls_tunnel(world: World, resume_after) -> None:
    mine = open_tunnel(world, DEPLOYER, DTOKEN, world.ticker_port)
    theirs = open_tunnel(world, CODER, CTOKEN, world.ticker_port)
    assert mine.recv(100).startswith(b"tick")  # end to end TLS with the upstream: not intercepted
    world.proxy.cli("kill", DEPLOYER, "--reason", "tunnel")
    mine.settimeout(1.0)
    with pytest.raises((OSError, ssl.SSLError)):
        while True:
            if not mine.recv(100):
                raise ConnectionResetError("closed")  # EOF: the tunnel was closed
    theirs.settimeout(2)
    assert theirs.recv(100).startswith(b"tick")
    # A new tunnel to a passed-through host is refused at CONNECT.
    with pytest.raises(AssertionError, match="403"):
        open_tunnel(world, DEPLOYER, DTOKEN, world.ticker_port)
    theirs.close()


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_kill_answers_a_request_stuck_upstream_with_403(
    world: World, scheme: str, resume_after
) -> None:
    up = world.plain if scheme == "http" else world.tls
    up.release.clear()
    result: list[requests.Response] = []
    sess = world.proxy.session(DEPLOYER, DTOKEN)
    t = threading.Thread(
        target=lambda: result.append(sess.get(f"{up.url}/slow-{scheme}", timeout=20))
    )
    t.start()
    wait_for(lambda: f"/slow-{scheme}" in up.paths("/slow"), 10, "the request to reach upstream")
    world.proxy.cli("kill", DEPLOYER, "--reason", "stuck")
    t.join(5)
    up.release.set()
    assert result, "the stuck request was not answered"
    r = result[0]
    assert r.status_code == 403
    assert r.json()["error"] == "agent_killed" and r.json()["reason"] == "stuck"


def test_inbound_to_a_killed_agents_address_is_refused(world: World, resume_after) -> None:
    coder = world.proxy.session(CODER, CTOKEN)
    url = f"{world.inbound.url}/call-deployer"
    assert coder.get(url, timeout=10).status_code == 200
    world.proxy.cli("kill", DEPLOYER, "--reason", "inbound")
    r = coder.get(url, timeout=10)
    assert r.status_code == 403 and r.json()["error"] == "agent_killed"
    assert "deployer" in r.json()["reason"]
    world.proxy.cli("resume", DEPLOYER)
    assert coder.get(url, timeout=10).status_code == 200


# ---------------------------------------------------------------- park


def parked_decisions(proxy: Proxy, prefix: str) -> list[str]:
    return [
        r["path"]
        for r in proxy.audit_events("decision")
        if r.get("verdict") == "park" and r.get("path", "").startswith(prefix)
    ]


def fire(
    world: World, out: Path, prefix: str, n: int, timeout: float = 60
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(HERE / "park_worker.py"), str(out), prefix, str(n), str(timeout)],
        env=world.proxy.env(DEPLOYER, DTOKEN),
    )


def test_park_holds_100_requests_and_resume_releases_them_in_arrival_order(
    world: World, tmp_path: Path, resume_after
) -> None:
    world.proxy.cli("pause", DEPLOYER, "--reason", "hold")
    procs = [
        fire(world, tmp_path / f"p{i}.jsonl", f"{world.ordered.url}/order/{i}", 25)
        for i in range(4)
    ]
    try:
        wait_for(lambda: len(parked_decisions(world.proxy, "/order/")) == 100, 30, "100 parked")
        assert world.ordered.paths("/order/") == []  # nothing reached upstream
        status = json.loads(world.proxy.cli("status", "--json").stdout)
        row = next(r for r in status["agents"] if r["agent"] == DEPLOYER)
        assert row["state"] == "paused"
        wait_for(lambda: _parked(world, DEPLOYER) == 100, 10, "status to show 100 parked")

        world.proxy.cli("resume", DEPLOYER)
        wait_for(lambda: len(world.ordered.paths("/order/")) == 100, 30, "all 100 released")
        assert world.ordered.paths("/order/") == parked_decisions(world.proxy, "/order/")
    finally:
        for p in procs:
            p.wait(60)
    results = [r for i in range(4) for r in iter_jsonl(tmp_path / f"p{i}.jsonl")]
    assert len(results) == 100 and all(r["status"] == 200 for r in results)


def _parked(world: World, agent: str) -> int:
    status = json.loads(world.proxy.cli("status", "--json").stdout)
    return int(next(r for r in status["agents"] if r["agent"] == agent)["parked"])


def test_paused_then_killed_parked_flows_get_403(
    world: World, tmp_path: Path, resume_after
) -> None:
    world.proxy.cli("pause", DEPLOYER)
    out = tmp_path / "k.jsonl"
    proc = fire(world, out, f"{world.plain.url}/pk", 5)
    wait_for(lambda: len(parked_decisions(world.proxy, "/pk")) == 5, 20, "5 parked")
    world.proxy.cli("kill", DEPLOYER, "--reason", "no more")
    proc.wait(20)
    results = list(iter_jsonl(out))
    assert [r["status"] for r in results] == [403] * 5
    assert {r["decision"] for r in results} == {"agent_killed"}
    assert world.plain.paths("/pk") == []


def reload_to(world: World, text: str) -> None:
    world.proxy.edit_rules("base", text)


def test_park_timeout_and_park_full_answer_503(world: World, tmp_path: Path, resume_after) -> None:
    reload_to(world, base_yaml("{timeout: 1s, max_per_agent: 3}"))
    try:
        world.proxy.cli("pause", DEPLOYER)
        out = tmp_path / "t.jsonl"
        fire(world, out, f"{world.plain.url}/pt", 5).wait(30)
        statuses = sorted((r["status"], r["decision"]) for r in iter_jsonl(out))
        assert statuses == [(503, "park_full")] * 2 + [(503, "park_timeout")] * 3
        assert world.plain.paths("/pt") == []
    finally:
        reload_to(world, base_yaml())


def test_a_client_that_disconnects_while_parked_never_reaches_upstream(
    world: World, tmp_path: Path, resume_after
) -> None:
    world.proxy.cli("pause", DEPLOYER)
    gone = tmp_path / "gone.jsonl"
    fire(world, gone, f"{world.ordered.url}/gone", 3, timeout=0.5).wait(20)  # clients give up
    assert {r["status"] for r in iter_jsonl(gone)} == {0}
    world.proxy.cli("resume", DEPLOYER)
    sess = world.proxy.session(DEPLOYER, DTOKEN)
    assert sess.get(f"{world.ordered.url}/marker", timeout=10).status_code == 200
    assert world.ordered.paths("/gone") == []


def test_shutdown_answers_parked_flows_503_and_exits_cleanly(tmp_path: Path) -> None:
    up = start_upstream()
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "base.yaml").write_text(base_yaml())
    (rules / "agents.yaml").write_text(agents_yaml({DEPLOYER: (DTOKEN, ["local"])}))
    proxy = start_proxy(rules, tmp_path / "state")
    try:
        proxy.cli("pause", DEPLOYER)
        out = tmp_path / "s.jsonl"
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "park_worker.py"), str(out), f"{up.url}/sd", "3"],
            env=proxy.env(DEPLOYER, DTOKEN),
        )
        wait_for(lambda: len(parked_decisions(proxy, "/sd")) == 3, 20, "3 parked")
        assert proxy.stop() == 0
        proc.wait(20)
        assert [(r["status"], r["decision"]) for r in iter_jsonl(out)] == [
            (503, "proxy_shutdown")
        ] * 3
        assert up.paths("/sd") == []
    finally:
        proxy.stop()
        up.server.shutdown()
