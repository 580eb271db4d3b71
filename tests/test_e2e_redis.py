"""Replicas sharing one Redis, end to end: a real redis-server started here, three real
`axme-fw run --redis` processes, real clients. Races across replicas, a kill acknowledged by
every replica, and Redis going away and coming back."""

from __future__ import annotations

import functools
import os
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.redis_rig import RedisServer
from tests.rig import (
    AXME_FW,
    Proxy,
    Upstream,
    agents_yaml,
    make_rules,
    server_cli,
    start_proxy,
    wait_for,
)

DTOKEN, CTOKEN, FTOKEN = "deployer-tok-9a1", "coder-tok-77b", "free-tok-31c"
ADMIN = "fleet-admin-token-2b7"
QTOKEN = "quiet-tok-5d0"
BASE = """\
version: 1
actions:
  any: {hosts: ["127.0.0.1"]}
  deploy: {hosts: ["127.0.0.1"], methods: [POST], paths: ["/v2/projects/*/services"]}
"""


@dataclass
class Fleet:
    redis: RedisServer
    replicas: list[Proxy]
    rules: Path

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [AXME_FW, "--redis", self.redis.url, *args],
            capture_output=True,
            text=True,
            timeout=30,
        )


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet")
    server = RedisServer(tmp)
    server.start()
    agents = agents_yaml(
        {
            "deployer": (DTOKEN, ["any", "deploy"]),
            "coder": (CTOKEN, ["any"]),
            "free": (FTOKEN, ["any"]),
            "quiet": (QTOKEN, ["any"]),
        },
        quiet="heartbeat: {stale_after: 1s}",
        deployer="limits:\n  actions:\n    deploy: {max: 3, per: 6h, on_exceed: kill}",
        coder="limits:\n  requests: {max: 1000, per: 1m, on_exceed: throttle}",
    )
    rules = make_rules(tmp / "rules", base=BASE, agents=agents)
    replicas = []
    os.environ["AXME_FW_ADMIN_TOKEN"] = ADMIN  # the replicas' admin operator (a Secret)
    try:
        for i in range(3):
            state = tmp / f"state-{i}"
            extra = ("--redis", server.url, "--replica-id", f"r{i}")
            replicas.append(start_proxy(rules, state, None, *extra))
        del os.environ["AXME_FW_ADMIN_TOKEN"]
        yield Fleet(server, replicas, rules)
    finally:
        for p in replicas:
            p.stop()
        server.stop()


def test_40_simultaneous_deploys_over_3_replicas_let_exactly_3_through(
    fleet: Fleet, up: Upstream
) -> None:
    def deploy(i: int) -> int:
        s = fleet.replicas[i % 3].session("deployer", DTOKEN)
        return s.post(f"{up.url}/v2/projects/p{i}/services", timeout=20).status_code

    with ThreadPoolExecutor(40) as pool:
        codes = list(pool.map(deploy, range(40)))
    assert codes.count(200) == 3, codes
    assert len(up.paths("/v2/projects/")) == 3  # what reached the API, across replicas

    # The 4th deploy killed the agent: every replica enforces it (the kill is shared).
    def refused(p: Proxy) -> bool:
        return p.session("deployer", DTOKEN).get(f"{up.url}/x", timeout=10).status_code == 403

    for p in fleet.replicas:
        wait_for(functools.partial(refused, p), 10, "the auto-kill on every replica")
    # The audit says which policy killed it, and on which replica.
    killed = [
        (r["by"], r["replica"]) for p in fleet.replicas for r in p.audit_events("agent.auto_killed")
    ]
    assert killed and {by for by, _ in killed} == {"policy:limits.actions.deploy"}
    assert {rep for _, rep in killed} <= {"r0", "r1", "r2"}
    res = fleet.cli("resume", "deployer")
    assert res.returncode == 0, res.stderr
    assert "enforced by 3/3 replicas" in res.stdout


def test_a_kill_in_redis_is_acknowledged_by_every_replica(fleet: Fleet, up: Upstream) -> None:
    res = fleet.cli("kill", "coder", "--reason", "runaway")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("killed coder: enforced by 3/3 replicas in ")
    for p in fleet.replicas:  # acknowledged means enforced: no waiting here
        r = p.session("coder", CTOKEN).get(f"{up.url}/c", timeout=10)
        assert r.status_code == 403 and r.json()["error"] == "agent_killed"
        assert r.json()["reason"] == "runaway"
    res = fleet.cli("resume", "coder")
    assert res.returncode == 0 and "enforced by 3/3 replicas" in res.stdout, res.stderr
    for p in fleet.replicas:
        assert p.session("coder", CTOKEN).get(f"{up.url}/c", timeout=10).status_code == 200
    res = fleet.cli("status", "--json")
    assert res.returncode == 0, res.stderr
    import json

    data = json.loads(res.stdout)
    assert [r["replica"] for r in data["replicas"]] == ["r0", "r1", "r2"]
    assert all(r["in_sync"] and r["listen"] for r in data["replicas"]), data


def test_a_replica_that_stops_is_named_and_the_kill_fails(fleet: Fleet, tmp_path: Path) -> None:
    extra = ("--redis", fleet.redis.url, "--replica-id", "late")
    late = start_proxy(fleet.rules, tmp_path / "state", None, *extra)
    r = redis.Redis(port=fleet.redis.port)
    wait_for(lambda: r.hget("axfw:acks", "late") is not None, 10, "the late replica's ack")
    wait_for(lambda: r.exists("axfw:replica:late"), 10, "the late replica's heartbeat")
    late.proc.send_signal(19)  # SIGSTOP: alive (heartbeat key still fresh), not answering
    try:
        res = fleet.cli("kill", "free")
        assert res.returncode == 1
        assert "enforced by 3/4 replicas" in res.stderr and "late" in res.stderr
    finally:
        late.proc.send_signal(18)  # SIGCONT
        late.stop()
        fleet.cli("resume", "free")


def test_redis_down_fails_closed_for_shared_limits_keeps_kills_then_recovers(
    fleet: Fleet, up: Upstream
) -> None:
    assert fleet.cli("kill", "deployer").returncode == 0
    fleet.redis.stop()
    try:
        p = fleet.replicas[0]
        r = p.session("coder", CTOKEN).get(f"{up.url}/down", timeout=10)  # has a shared limit
        assert r.status_code == 503 and r.json()["error"] == "store_unavailable"
        assert p.session("free", FTOKEN).get(f"{up.url}/down", timeout=10).status_code == 200
        r = p.session("deployer", DTOKEN).get(f"{up.url}/down", timeout=10)
        assert r.status_code == 403 and r.json()["error"] == "agent_killed"  # never forgotten
        wait_for(lambda: p.audit_events("store.down"), 10, "store.down audited")
    finally:
        fleet.redis.start()
    p = fleet.replicas[0]
    wait_for(lambda: p.audit_events("store.up"), 10, "store.up audited")
    # Redis came back empty (no persistence here): the replicas put the kill list back.
    r = p.session("deployer", DTOKEN).get(f"{up.url}/after", timeout=10)
    assert r.status_code == 403 and r.json()["error"] == "agent_killed"
    wait_for(lambda: fleet.cli("resume", "deployer").returncode == 0, 10, "resume after restore")
    wait_for(
        lambda: p.session("deployer", DTOKEN).get(f"{up.url}/r", timeout=10).status_code == 200,
        10,
        "the resume on a replica",
    )
    assert len(p.audit_events("store.down")) == 1  # once per outage, not per request
    wait_for(
        lambda: p.session("coder", CTOKEN).get(f"{up.url}/up", timeout=10).status_code == 200,
        10,
        "shared limits again",
    )
    rc = redis.Redis(port=fleet.redis.port)
    wait_for(lambda: len(list(rc.scan_iter("axfw:replica:*"))) == 3, 10, "all 3 registered again")


def test_a_kill_through_one_replicas_admin_api_holds_on_every_replica(
    fleet: Fleet, up: Upstream
) -> None:
    admin = fleet.replicas[1].admin_port
    res = server_cli(admin, ADMIN, "kill", "free", "--reason", "from the laptop")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("killed free: enforced by 3/3 replicas in ")
    for p in fleet.replicas:
        r = p.session("free", FTOKEN).get(f"{up.url}/f", timeout=10)
        assert r.status_code == 403 and r.json()["by"] == "api:admin"
    res = server_cli(admin, ADMIN, "resume", "free")
    assert res.returncode == 0 and "3/3 replicas" in res.stdout, res.stderr
    for p in fleet.replicas:
        assert p.session("free", FTOKEN).get(f"{up.url}/f", timeout=10).status_code == 200


def test_health_is_fleet_wide_stale_alerts_once_and_status_merges_replicas(
    fleet: Fleet, up: Upstream
) -> None:
    import json

    for p in fleet.replicas:
        assert p.session("quiet", QTOKEN).get(f"{up.url}/q", timeout=10).status_code == 200

    def fleet_view() -> dict[str, object]:
        data = json.loads(fleet.cli("status", "--json").stdout)
        return next((a for a in data["agents"] if a["agent"] == "quiet"), {})

    wait_for(lambda: fleet_view().get("requests") == 3, 10, "the merged health")
    assert fleet_view()["instances"] == ["127.0.0.1"]

    def stale_everywhere() -> bool:
        for p in fleet.replicas:
            live = json.loads((p.state / "live.json").read_text())
            if not live["health"]["agents"]["quiet"][2]:
                return False
        return True

    wait_for(stale_everywhere, 15, "every replica to see quiet go stale")
    stale = [r for p in fleet.replicas for r in p.audit_events("agent.stale")]
    assert [r["agent"] for r in stale] == ["quiet"]  # once for the fleet, not per replica
    fleet.replicas[2].session("quiet", QTOKEN).get(f"{up.url}/q", timeout=10)
    wait_for(lambda: any(p.audit_events("agent.recovered") for p in fleet.replicas), 10, "recovery")
    recovered = [r for p in fleet.replicas for r in p.audit_events("agent.recovered")]
    assert len(recovered) == 1


def test_status_through_any_replicas_admin_api_shows_every_replica_and_instance(
    fleet: Fleet, up: Upstream
) -> None:
    """``axme-fw --server URL status`` on one replica: the fleet as Redis holds it, every
    replica and the agent's 4 instances wherever they connect (r0 twice, r1, r2)."""
    import json

    for i, p in enumerate(fleet.replicas[j] for j in (0, 1, 2, 0)):
        r = p.session("coder", CTOKEN).get(
            f"{up.url}/s{i}", headers={"X-Agent-Instance": f"pod-{i}"}, timeout=10
        )
        assert r.status_code == 200

    def status(*args: str) -> str:
        res = server_cli(fleet.replicas[1].admin_port, ADMIN, "status", *args)
        assert res.returncode == 0, res.stderr
        return res.stdout

    def coder() -> dict[str, Any]:
        view = json.loads(status("--json"))["fleet"]
        return next((a for a in view["agents"] if a["agent"] == "coder"), {})

    pods = {f"pod-{i}" for i in range(4)}
    wait_for(lambda: pods <= set(coder().get("instances") or ()), 10, "4 instances in the fleet")
    view = json.loads(status("--json"))["fleet"]
    assert [r["replica"] for r in view["replicas"]] == ["r0", "r1", "r2"]
    assert all(r["in_sync"] and r["listen"] for r in view["replicas"]), view
    assert {r["revision"] for r in view["replicas"]} == {view["revision"]}
    text = status()
    assert "fleet (Redis):" in text
    for rid in ("r0", "r1", "r2"):
        line = next((ln for ln in text.splitlines() if ln.startswith(f"  {rid} ")), "")
        assert line.endswith("in sync"), text
    assert "pod-0, pod-1, pod-2, pod-3" in text


def test_spend_ceiling_holds_across_replicas_with_concurrent_llm_calls(
    tmp_path: Path,
) -> None:
    import threading

    import httpx

    from tests import fake_llm
    from tests.rig import upstream_ca
    from tests.test_e2e_cost import PRICES, PRICING

    server = RedisServer(tmp_path)
    server.start()
    _ca, ctx, ca_pem = upstream_ca(tmp_path)
    fake = fake_llm.start(ctx)
    agents = agents_yaml(
        {"burst": ("tok-b", ["any"])},
        burst="limits:\n  cost_usd: {max: 0.1, per: 1d, on_exceed: throttle}",
    )
    rules = make_rules(tmp_path / "rules", base=BASE, agents=agents, pricing=PRICING)
    extra = ("--redis", server.url)
    replicas = [
        start_proxy(rules, tmp_path / f"s{i}", ca_pem, *extra, "--replica-id", f"c{i}")
        for i in range(2)
    ]
    body = {"model": "test-gpt", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2000}
    codes: list[int] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        p = replicas[i % 2]
        with httpx.Client(proxy=p.url("burst", "tok-b"), verify=p.ssl_context(), timeout=30) as c:
            r = c.post(f"{fake.url}/v1/chat/completions", json=body, headers={"x-test-id": f"c{i}"})
        with lock:
            codes.append(r.status_code)

    fake.hold = 0.5  # every admitted call stays in flight while the others arrive
    try:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        fake.hold = 0.0
        admitted = codes.count(200)
        assert admitted >= 1 and codes.count(429) == 20 - admitted

        def settled() -> bool:
            return sum(len(p.audit_events("llm.usage")) for p in replicas) == admitted

        wait_for(settled, 10, "every call settled")
        r = redis.Redis(port=server.port, decode_responses=True)
        events: list[str] = r.zrange("axfw:w:burst:cost_usd", 0, -1)  # type: ignore[assignment]
        spent = sum(float(m.rsplit(":", 1)[1]) for m in events)
        # Bound, across replicas: spend + reservations < max + one estimate.
        one_estimate = 2000 * PRICES["test-gpt"]["output"] / 1e6 + 0.001
        assert spent < 0.1 + one_estimate
        assert len([c for c in fake.calls if c["id"].startswith("c")]) == admitted
        assert not r.hgetall("axfw:h:burst:cost_usd")  # no reservation left open
    finally:
        fake.hold = 0.0
        for p in replicas:
            p.stop()
        fake.server.shutdown()
        server.stop()


def test_audit_merges_the_replicas_timelines_and_verifies_every_chain(fleet: Fleet) -> None:
    import json

    states = [a for p in fleet.replicas for a in ("--state", str(p.state))]
    res = subprocess.run(
        [AXME_FW, "audit", *states, "--json"], capture_output=True, text=True, timeout=30
    )
    assert res.returncode == 0, res.stderr
    records = [json.loads(line) for line in res.stdout.splitlines()]
    assert {r["state"] for r in records} == {str(p.state) for p in fleet.replicas}
    stamps = [r["ts"] for r in records]
    assert stamps == sorted(stamps)  # one timeline, by time
    res = subprocess.run(
        [AXME_FW, "audit", "verify", *states], capture_output=True, text=True, timeout=30
    )
    assert res.returncode == 0 and res.stdout.count("audit log intact:") == 3, res.stderr
    res = subprocess.run(
        [AXME_FW, "audit", "verify", *states, "--json"], capture_output=True, text=True, timeout=30
    )
    out = json.loads(res.stdout)
    assert out["ok"] is True and len(out["chains"]) == 3


def test_a_replica_that_never_read_the_kill_list_serves_nothing(
    tmp_path: Path, up: Upstream
) -> None:
    import requests

    server = RedisServer(tmp_path)  # not started yet
    rules = make_rules(
        tmp_path / "rules", base=BASE, agents=agents_yaml({"free": (FTOKEN, ["any"])})
    )
    p = start_proxy(rules, tmp_path / "state", None, "--redis", server.url)
    try:
        r = p.session("free", FTOKEN).get(f"{up.url}/n", timeout=10)
        assert r.status_code == 503 and r.json()["error"] == "store_unavailable"
        s = requests.Session()
        s.trust_env = False
        ready = f"http://127.0.0.1:{p.admin_port}/readyz"
        assert s.get(ready, timeout=10).status_code == 503
        server.start()
        wait_for(lambda: s.get(ready, timeout=10).status_code == 200, 15, "ready with Redis")
        assert p.session("free", FTOKEN).get(f"{up.url}/n", timeout=10).status_code == 200
    finally:
        p.stop()
        server.stop()


def test_20_concurrent_kills_and_resumes_through_different_replicas_are_serial(
    fleet: Fleet,
) -> None:
    """20 kills and resumes of 4 agents at once, half by the ``--redis`` CLI, half by the
    admin APIs of the 3 replicas. Each write gets its own revision, and the final list is
    what applying them one by one in that order gives: per agent, the last write wins."""
    import json
    import re

    import requests

    agents = [f"k{i}" for i in range(4)]

    def one(i: int) -> tuple[int, str, bool]:
        agent, kill = agents[i % 4], (i // 4) % 2 == 0  # per agent: kill, resume, kill, …
        if i % 2 == 0:
            res = fleet.cli("kill" if kill else "resume", agent)
            assert res.returncode == 0, res.stderr
            m = re.search(r"enforced by 3/3 replicas in \d+ ms \(revision (\d+)\)$", res.stdout)
            assert m is not None, res.stdout
            return int(m[1]), agent, kill
        s = requests.Session()
        s.trust_env = False
        url = f"http://127.0.0.1:{fleet.replicas[i % 3].admin_port}/v1/kills"
        headers = {"Authorization": f"Bearer {ADMIN}"}
        if kill:
            r = s.post(url, json={"agent": agent}, headers=headers, timeout=30)
        else:
            r = s.delete(f"{url}/{agent}", headers=headers, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["enforced_by"] == ["3/3 replicas"]
        return int(r.json()["revision"]), agent, kill

    with ThreadPoolExecutor(20) as pool:
        writes = list(pool.map(one, range(20)))
    revisions = sorted(rev for rev, _, _ in writes)
    assert len(set(revisions)) == 20, writes  # one revision per write: none merged or lost
    serial: dict[str, bool] = {}
    for _rev, agent, kill in sorted(writes):
        serial[agent] = kill
    data = json.loads(fleet.cli("status", "--json").stdout)
    assert data["revision"] >= revisions[-1]
    assert {a for a in agents if serial[a]} == set(data["kills"]) & set(agents), writes
    assert {r["revision"] for r in data["replicas"]} == {data["revision"]}  # one revision
    for agent in agents:
        fleet.cli("resume", agent)
    data = json.loads(fleet.cli("status", "--json").stdout)
    assert not set(agents) & set(data["kills"])
