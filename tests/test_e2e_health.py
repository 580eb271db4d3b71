"""End to end: heartbeats, stale alerts to webhooks, the control host, status."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.rig import (
    AXME_FW,
    Proxy,
    Upstream,
    agents_yaml,
    free_port,
    start_proxy,
    start_upstream,
    wait_for,
)

QUIET, QTOKEN = "quiet", "tok-q"  # goes stale
FLEET, FTOKEN = "fleet", "tok-f"  # 4 instances
OTHER, OTOKEN = "other", "tok-o"


@dataclass
class Receiver:
    port: int
    events: list[dict[str, Any]] = field(default_factory=list)

    def of(self, event: str, agent: str) -> list[dict[str, Any]]:
        return [e for e in list(self.events) if e["event"] == event and e.get("agent") == agent]


def start_receiver() -> tuple[Receiver, ThreadingHTTPServer]:
    holder: list[Receiver] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            holder[0].events.append(json.loads(body))
            self.send_response(204)
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    holder.append(Receiver(int(server.server_address[1])))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return holder[0], server


@dataclass
class World:
    proxy: Proxy
    up: Upstream
    hooks: Receiver


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("health")
    up = start_upstream()
    hooks, hook_server = start_receiver()
    dead = free_port()  # nothing listens here
    rules = tmp / "rules"
    rules.mkdir()
    (rules / "base.yaml").write_text(f"""\
version: 1
defaults:
  heartbeat: {{stale_after: 5m}}
alerts:
  - webhook: http://127.0.0.1:{hooks.port}/hook/SECRET-PATH
    events: [agent.stale, agent.recovered, agent.killed, agent.resumed, rules.rejected]
  - webhook: http://127.0.0.1:{dead}/dead/SECRET-PATH
    events: [agent.killed]
actions:
  local: {{hosts: ["127.0.0.1"]}}
""")
    (rules / "agents.yaml").write_text(
        agents_yaml(
            {QUIET: (QTOKEN, ["local"]), FLEET: (FTOKEN, ["local"]), OTHER: (OTOKEN, ["local"])},
            quiet="heartbeat: {stale_after: 1s}",
        )
    )
    proxy = start_proxy(rules, tmp / "state")
    yield World(proxy, up, hooks)
    proxy.stop()
    up.server.shutdown()
    hook_server.shutdown()


def status(proxy: Proxy) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(proxy.cli("status", "--json").stdout)
    return out


def agent_row(proxy: Proxy, agent: str) -> dict[str, Any]:
    return next(r for r in status(proxy)["agents"] if r["agent"] == agent)


def test_stale_alerts_once_and_recovers_once(world: World) -> None:
    proxy, hooks = world.proxy, world.hooks
    s = proxy.session(QUIET, QTOKEN)
    assert s.get(f"{world.up.url}/hi", timeout=10).status_code == 200
    wait_for(lambda: agent_row(proxy, QUIET)["state"] == "active", 5, "status to show active")
    stale = wait_for(lambda: hooks.of("agent.stale", QUIET), 10, "an agent.stale alert")
    assert stale[0]["text"].startswith("axme-fw agent.stale: quiet")  # Slack-compatible
    wait_for(lambda: agent_row(proxy, QUIET)["state"] == "stale", 5, "status to show stale")

    assert s.get(f"{world.up.url}/back", timeout=10).status_code == 200
    wait_for(lambda: hooks.of("agent.recovered", QUIET), 10, "an agent.recovered alert")
    # Every sweep between going stale and coming back could have re-sent it: it did not.
    assert len(hooks.of("agent.stale", QUIET)) == 1
    assert len(hooks.of("agent.recovered", QUIET)) == 1
    wait_for(lambda: agent_row(proxy, QUIET)["state"] == "active", 5, "status to show active")


def control(
    proxy: Proxy, agent: str, token: str, path: str, method: str = "GET"
) -> requests.Response:
    return proxy.session(agent, token).request(method, f"http://axme-fw.local{path}", timeout=10)


def test_control_host_answers_heartbeat_and_status_without_upstream(world: World) -> None:
    proxy = world.proxy
    before = len(world.up.seen)
    r = control(proxy, OTHER, OTOKEN, "/heartbeat", "POST")
    assert r.status_code == 200
    body = r.json()
    assert body["agent"] == OTHER and body["state"] == "active" and body["kill"] is None
    assert control(proxy, OTHER, OTOKEN, "/status").json()["agent"] == OTHER
    assert control(proxy, OTHER, "wrong", "/status").status_code == 403
    assert control(proxy, None, None, "/status").status_code == 407  # type: ignore[arg-type]
    assert len(world.up.seen) == before


def test_an_agent_can_read_but_never_change_its_state(world: World) -> None:
    proxy = world.proxy
    proxy.cli("kill", OTHER, "--reason", "read-only check")
    try:
        body = control(proxy, OTHER, OTOKEN, "/status").json()
        assert body["state"] == "killed"
        assert body["kill"]["reason"] == "read-only check"
        for path, method in (
            ("/resume", "POST"),
            ("/kill", "POST"),
            ("/status", "DELETE"),
            ("/limits", "PUT"),
        ):
            r = control(proxy, OTHER, OTOKEN, path, method)
            assert r.status_code in (403, 405), (path, method)
            assert r.json()["error"] == "control_forbidden"
        wait_for(lambda: agent_row(proxy, OTHER)["state"] == "killed", 5, "status: killed")
        assert proxy.session(OTHER, OTOKEN).get(f"{world.up.url}/x", timeout=10).status_code == 403
    finally:
        proxy.cli("resume", OTHER)


def test_a_dead_webhook_delays_no_flow_and_its_failure_is_audited(world: World) -> None:
    proxy = world.proxy
    failed_before = len(proxy.audit_events("alert.failed"))
    proxy.cli("kill", QUIET, "--reason", "alert to a dead hook")  # agent.killed -> both hooks
    s = proxy.session(FLEET, FTOKEN)
    try:
        # The dead hook is retried with backoff for seconds; flows go on meanwhile.
        for i in range(20):
            assert s.get(f"{world.up.url}/flow-{i}", timeout=10).status_code == 200
        assert len(proxy.audit_events("alert.failed")) == failed_before  # still retrying
        assert world.hooks.of("agent.killed", QUIET)  # the live hook got it at once
        failed = wait_for(
            lambda: proxy.audit_events("alert.failed")[failed_before:], 20, "alert.failed"
        )
        assert failed[0]["alert"] == "agent.killed" and failed[0]["tries"] == 4
        assert "SECRET-PATH" not in (proxy.state / "audit.jsonl").read_text()
    finally:
        proxy.cli("resume", QUIET)


def test_status_shows_4_instances_with_distinct_last_seen(world: World) -> None:
    proxy = world.proxy
    s = proxy.session(FLEET, FTOKEN)
    for i in range(4):
        r = s.get(f"{world.up.url}/i{i}", headers={"X-Agent-Instance": f"pod-{i}"}, timeout=10)
        assert r.status_code == 200
        time.sleep(0.002)  # distinct millisecond timestamps, not a wait for a condition
    # The header is stripped before forwarding.
    assert all("x-agent-instance" not in x.headers for x in world.up.seen)

    def pods() -> list[dict[str, Any]] | None:
        found = [
            i for i in agent_row(proxy, FLEET)["instances"] if i["instance"].startswith("pod-")
        ]
        return found if len(found) == 4 else None

    instances = wait_for(pods, 5, "4 instances")
    assert sorted(i["instance"] for i in instances) == [f"pod-{i}" for i in range(4)]
    assert len({i["last_seen"] for i in instances}) == 4
    assert all(i["state"] == "active" and i["requests"] == 1 for i in instances)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_status_table_is_readable_at_80_columns_in_a_real_terminal(
    world: World, tmp_path: Path
) -> None:
    proxy = world.proxy
    proxy.cli(
        "kill", OTHER, "--reason", "a reason long enough to need folding inside the why column"
    )
    name = f"axme-status-{proxy.port}"
    cmd = (
        f"AXME_FW_RULES={proxy.rules} AXME_FW_STATE={proxy.state} {AXME_FW} status; "
        "echo __END__; sleep 30"
    )
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", name, "-x", "80", "-y", "40", cmd], check=True
    )
    try:

        def screen() -> str | None:
            out = subprocess.run(
                ["tmux", "capture-pane", "-p", "-t", name],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            return out if "__END__" in out else None

        text = wait_for(screen, 20, "the status table in tmux")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], check=False)
        proxy.cli("resume", OTHER)
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines)
    header = next(line for line in lines if line.lstrip().startswith("agent"))
    for col in ("state", "seen", "reqs", "limits", "why"):
        assert col in header
    rows = {
        line.split()[0]: line
        for line in lines
        if line.split() and line.split()[0] in (QUIET, FLEET, OTHER)
    }
    assert set(rows) == {QUIET, FLEET, OTHER}
    assert "killed" in rows[OTHER] and "a reason" in rows[OTHER]
    assert "folding" in text  # the long reason wraps inside its column, nothing cut
    assert "proxy pid" in text


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_status_watch_refreshes_in_place(world: World) -> None:
    proxy = world.proxy
    name = f"axme-watch-{proxy.port}"
    cmd = f"AXME_FW_RULES={proxy.rules} AXME_FW_STATE={proxy.state} {AXME_FW} status --watch"
    subprocess.run(
        ["tmux", "new-session", "-d", "-s", name, "-x", "80", "-y", "40", cmd], check=True
    )

    def screen() -> str:
        return subprocess.run(
            ["tmux", "capture-pane", "-p", "-t", name], capture_output=True, text=True, check=True
        ).stdout

    try:
        wait_for(lambda: FLEET in screen(), 20, "the first frame")
        assert "watch kill" not in screen()
        proxy.cli("kill", FLEET, "--reason", "watch kill")

        def refreshed() -> str | None:
            frame = screen()
            return frame if "watch kill" in frame else None

        text = wait_for(refreshed, 10, "a refresh")
        assert text.count("agent ") == 1  # redrawn in place, not appended below
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], check=False)
        proxy.cli("resume", FLEET)
