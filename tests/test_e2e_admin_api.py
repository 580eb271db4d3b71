"""The admin API end to end: a real `axme-fw run`, operators made by the real CLI, the CLI
as a client (`axme-fw --server`), curl-level checks of auth, roles, errors and metrics."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import trustme

from tests.rig import (
    AXME_FW,
    Proxy,
    Upstream,
    agents_yaml,
    make_rules,
    start_proxy,
    wait_for,
)

DTOKEN = "deployer-agent-token-4f1e"
BASE = 'version: 1\nactions:\n  any: {hosts: ["*"]}\n'


@dataclass
class World:
    proxy: Proxy
    op: str  # an operator's token
    viewer: str  # a viewer's token

    @property
    def server(self) -> str:
        return f"http://127.0.0.1:{self.proxy.admin_port}"

    def remote(self, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
        """The CLI on another machine: no rules or state directory, only --server."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AXME_FW_")}
        env.update(AXME_FW_SERVER=self.server, AXME_FW_ADMIN_TOKEN=token or self.op)
        env.update(AXME_FW_RULES="/nonexistent/rules", AXME_FW_STATE="/nonexistent/state")
        return subprocess.run([AXME_FW, *args], capture_output=True, text=True, env=env, timeout=30)

    def api(self, method: str, path: str, token: str | None, **kw: object) -> requests.Response:
        s = requests.Session()
        s.trust_env = False
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return s.request(method, self.server + path, headers=headers, timeout=10, **kw)  # type: ignore[arg-type]


def operator_add(rules: Path, name: str, role: str) -> str:
    res = subprocess.run(
        [AXME_FW, "operator", "add", name, "--role", role, "--rules", str(rules)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 0, res.stderr
    token = res.stdout.strip()
    assert "\n" not in token and len(token) >= 32  # stdout: the token alone
    return token


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, up: Upstream) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("adminapi")
    rules = make_rules(
        tmp / "rules", base=BASE, agents=agents_yaml({"deployer": (DTOKEN, ["any"])})
    )
    op, viewer = operator_add(rules, "alice", "operator"), operator_add(rules, "vic", "viewer")
    assert op not in (rules / "operators.generated.yaml").read_text()  # only its hash
    p = start_proxy(rules, tmp / "state")
    yield World(p, op, viewer)
    p.stop()
    for f in [p.log, *p.state.rglob("*"), *rules.rglob("*")]:
        if f.is_file():
            text = f.read_text(errors="replace")
            assert op not in text and viewer not in text, f"a token leaked into {f}"


def test_kill_from_a_laptop_cuts_the_agent_and_resume_lets_it_back(
    world: World, up: Upstream
) -> None:
    agent = world.proxy.session("deployer", DTOKEN)
    assert agent.get(up.url + "/before", timeout=10).status_code == 200
    res = world.remote("kill", "deployer", "--reason", "runaway deploys")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("killed deployer: enforced by the proxy on 127.0.0.1:")
    r = agent.get(up.url + "/after", timeout=10)
    assert r.status_code == 403 and r.json()["error"] == "agent_killed"
    assert r.json()["by"] == "api:alice" and r.json()["reason"] == "runaway deploys"
    wait_for(lambda: world.proxy.audit_events("agent.killed"), 10, "the audit")
    killed = world.proxy.audit_events("agent.killed")[-1]
    assert (killed["by"], killed["address"]) == ("api:alice", "127.0.0.1")
    listed = world.api("GET", "/v1/kills", world.viewer).json()
    assert [k["agent"] for k in listed["kills"]] == ["deployer"]
    res = world.remote("resume", "deployer", "--reason", "fixed")
    assert res.returncode == 0 and res.stdout.startswith("resumed deployer: enforced"), res.stderr
    assert agent.get(up.url + "/again", timeout=10).status_code == 200
    wait_for(lambda: world.proxy.audit_events("agent.resumed"), 10, "the audit")
    assert world.proxy.audit_events("agent.resumed")[-1]["by"] == "api:alice"


def test_pause_and_glob_kill_through_the_api(world: World, up: Upstream) -> None:
    r = world.api("POST", "/v1/kills", world.op, json={"agent": "deploy*", "mode": "park"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["revision"] > 0 and body["enforced_ms"] < 2000 and body["mode"] == "park"
    assert world.api("DELETE", "/v1/kills/deploy*", world.op).status_code == 200
    assert world.proxy.session("deployer", DTOKEN).get(up.url + "/p", timeout=10).ok


def test_roles_tokens_and_errors(world: World) -> None:
    res = world.remote("kill", "deployer", token=world.viewer)
    assert res.returncode == 1
    assert res.stderr.strip().count("\n") == 0 and "refused this call (HTTP 403)" in res.stderr
    assert "vic is a viewer" in res.stderr
    assert world.api("GET", "/v1/kills", None).status_code == 401
    assert world.api("GET", "/v1/kills", "Bearer-less").status_code == 401
    bad = world.api("POST", "/v1/kills", world.op, data=b"not json")
    assert bad.status_code == 400 and bad.json()["error"] == "bad_request"
    bad = world.api("POST", "/v1/kills", world.op, json={"agent": "a b"})
    assert bad.status_code == 400
    bad = world.api("POST", "/v1/kills", world.op, json={"agent": "x", "mode": "maybe"})
    assert bad.status_code == 400
    assert world.api("GET", "/v1/nothing", world.op).json()["error"] == "not_found"
    assert world.api("PUT", "/v1/status", world.op).status_code == 405
    bad = world.api("GET", "/v1/audit", world.viewer, params={"since": "yesterday-ish"})
    assert bad.status_code == 400 and "since" in bad.json()["detail"]


def test_status_audit_and_verify_through_the_cli_client(world: World) -> None:
    import json

    res = world.remote("status", "--json", token=world.viewer)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert "deployer" in [a["agent"] for a in data["agents"]]
    res = world.remote("status", token=world.viewer)
    assert res.returncode == 0 and "deployer" in res.stdout
    world.api("POST", "/v1/kills", world.op, json={"agent": "deployer", "reason": "r1"})
    world.api("DELETE", "/v1/kills/deployer", world.op)
    res = world.remote("audit", "--since", "1h", "--agent", "deployer", token=world.viewer)
    assert res.returncode == 0 and "agent.killed" in res.stdout and "api:alice" in res.stdout
    res = world.remote("audit", "--json", token=world.viewer)
    events = [json.loads(line)["event"] for line in res.stdout.splitlines()]
    assert "proxy.started" in events and "decision" in events  # --json: every record
    res = world.remote("audit", "verify", token=world.viewer)
    assert res.returncode == 0 and res.stdout.startswith("audit log intact:"), res.stderr
    res = world.remote("audit", "verify", "--json", token=world.viewer)
    assert json.loads(res.stdout)["ok"] is True


def test_metrics_count_requests_kills_and_fold_unknown_agents(world: World, up: Upstream) -> None:
    world.proxy.session("ghost", "nope").get(up.url + "/m", timeout=10)
    world.api("POST", "/v1/kills", world.op, json={"agent": "deployer"})
    world.proxy.session("deployer", DTOKEN).get(up.url + "/m", timeout=10)
    world.api("DELETE", "/v1/kills/deployer", world.op)
    assert world.api("GET", "/metrics", None).status_code == 401
    text = world.api("GET", "/metrics", world.viewer).text
    assert 'axme_fw_requests_total{agent="deployer",reason="agent_killed",verdict="refuse"}' in text
    assert 'axme_fw_requests_total{agent="unknown",reason="unknown_agent",verdict="refuse"}' in text
    assert "ghost" not in text  # names not in the rules never become labels
    assert 'axme_fw_kills_total{mode="block",source="api"}' in text
    assert "axme_fw_resumes_total" in text and "axme_fw_decision_seconds_bucket" in text
    assert "axme_fw_rules_reloads_total" in text and "axme_fw_parked_flows" in text


def test_operators_are_hot_reloaded(world: World) -> None:
    token = operator_add(world.proxy.rules, "carol", "viewer")
    wait_for(lambda: world.api("GET", "/v1/kills", token).status_code == 200, 10, "carol's token")


def test_repeated_failures_from_one_address_are_braked_and_audited(
    tmp_path: Path, up: Upstream
) -> None:
    rules = make_rules(tmp_path / "rules", base=BASE, agents=agents_yaml({"x": ("t", ["any"])}))
    token = operator_add(rules, "alice", "operator")
    p = start_proxy(rules, tmp_path / "state")
    try:
        w = World(p, token, token)
        codes = [w.api("GET", "/v1/status", "wrong-guess").status_code for _ in range(6)]
        assert codes == [401] * 5 + [429]
        r = w.api("GET", "/v1/status", token)  # even the right token waits now
        assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
        wait_for(lambda: len(p.audit_events("admin.auth_failed")) >= 5, 10, "the audit")
        failed = p.audit_events("admin.auth_failed")
        assert len(failed) == 5 and failed[-1]["failures"] == 5
        assert "wrong-guess" not in p.log.read_text() + (p.state / "audit.jsonl").read_text()
    finally:
        p.stop()


def test_tls_admin_api_with_a_private_ca(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "admin.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    rules = make_rules(tmp_path / "rules", base=BASE, agents=agents_yaml({"x": ("t", ["any"])}))
    token = operator_add(rules, "alice", "viewer")
    pem = str(tmp_path / "admin.pem")
    p = start_proxy(rules, tmp_path / "state", None, "--admin-cert", pem, "--admin-key", pem)
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AXME_FW_")}
        env["AXME_FW_ADMIN_TOKEN"] = token
        url = f"https://localhost:{p.admin_port}"
        args = [AXME_FW, "--server", url, "--cacert", str(tmp_path / "ca.pem"), "status", "--json"]
        res = subprocess.run(args, capture_output=True, text=True, env=env, timeout=30)
        assert res.returncode == 0, res.stderr
        res = subprocess.run(
            [AXME_FW, "--server", url, "status"],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
        )
        assert res.returncode == 1 and "cannot reach the admin API" in res.stderr  # untrusted
    finally:
        p.stop()


def test_log_format_json_writes_one_object_per_line(tmp_path: Path, up: Upstream) -> None:
    import json

    rules = make_rules(tmp_path / "rules", base=BASE, agents=agents_yaml({"x": ("t", ["any"])}))
    p = start_proxy(rules, tmp_path / "state", None, "--log-format", "json")
    try:
        p.session("x", "t").get(up.url + "/j", timeout=10)
        p.session("x", "wrong").get(up.url + "/j", timeout=10)
    finally:
        p.stop()
    lines = [line for line in p.log.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line is JSON
    assert {"ts", "level", "logger", "msg"} <= set(records[0])
    assert any("admin API on http://127.0.0.1:" in r["msg"] for r in records)


def test_a_container_secret_in_the_environment_is_the_admin_operator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AXME_FW_ADMIN_TOKEN", "from-a-k8s-secret-0d3")
    rules = make_rules(tmp_path / "rules", base=BASE, agents=agents_yaml({"x": ("t", ["any"])}))
    p = start_proxy(rules, tmp_path / "state")
    monkeypatch.delenv("AXME_FW_ADMIN_TOKEN")
    try:
        w = World(p, "from-a-k8s-secret-0d3", "")
        r = w.api("POST", "/v1/kills", w.op, json={"agent": "x"})
        assert r.status_code == 200
        wait_for(lambda: p.audit_events("agent.killed"), 10, "the audit")
        assert p.audit_events("agent.killed")[-1]["by"] == "api:admin"
    finally:
        p.stop()
    assert "from-a-k8s-secret-0d3" not in p.log.read_text()


def test_token_lifecycle_rotate_and_remove(tmp_path: Path) -> None:
    rules = make_rules(tmp_path / "rules", base=BASE, agents=agents_yaml({"x": ("t", ["any"])}))
    old = operator_add(rules, "dana", "viewer")
    p = start_proxy(rules, tmp_path / "state")
    try:
        w = World(p, old, old)
        assert w.api("GET", "/v1/kills", old).status_code == 200
        again = subprocess.run(
            [AXME_FW, "operator", "add", "dana", "--role", "viewer", "--rules", str(rules)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert again.returncode == 1 and "--rotate" in again.stderr
        rotate = [AXME_FW, "operator", "add", "dana", "--role", "viewer", "--rotate"]
        res = subprocess.run(
            [*rotate, "--rules", str(rules)], capture_output=True, text=True, timeout=30
        )
        new = res.stdout.strip()
        assert res.returncode == 0 and new != old
        wait_for(lambda: w.api("GET", "/v1/kills", new).status_code == 200, 10, "the new token")
        assert w.api("GET", "/v1/kills", old).status_code == 401  # the old one is gone
        remove = [AXME_FW, "operator", "remove", "dana", "--rules", str(rules)]
        res = subprocess.run(remove, capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stderr
        wait_for(lambda: p.audit_events("rules.reloaded")[-1:] != [], 10, "a reload")
        wait_for(lambda: w.api("GET", "/v1/kills", new).status_code == 401, 10, "removed")
    finally:
        p.stop()


def test_metrics_parse_and_move_with_traffic_and_curl_kills(world: World, up: Upstream) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    def requests_total() -> float:
        text = world.api("GET", "/metrics", world.viewer).text
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        return sum(s.value for s in fams["axme_fw_requests"].samples if s.name.endswith("_total"))

    before = requests_total()
    world.proxy.session("deployer", DTOKEN).get(up.url + "/count", timeout=10)
    assert requests_total() == before + 1
    kill = [
        "curl", "-s", "-X", "POST", "-H", f"Authorization: Bearer {world.op}",
        "-d", '{"agent": "deployer", "reason": "curl"}', f"{world.server}/v1/kills",
    ]  # fmt: skip
    res = subprocess.run(
        kill, capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"}
    )
    import json

    assert json.loads(res.stdout)["action"] == "killed"
    r = world.proxy.session("deployer", DTOKEN).get(up.url + "/after-curl", timeout=10)
    assert r.status_code == 403 and r.json()["reason"] == "curl"
    assert world.api("DELETE", "/v1/kills/deployer", world.op).status_code == 200
