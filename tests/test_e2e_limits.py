"""End to end: policies that kill, park or throttle by themselves (the seed story)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.rig import (
    Proxy,
    Upstream,
    agents_yaml,
    iter_jsonl,
    make_rules,
    start_proxy,
    start_upstream,
    wait_for,
)

HERE = Path(__file__).parent
DEPLOYER, DTOKEN = "deployer", "tok-dep"
CODER, CTOKEN = "coder", "tok-cod"
BUILDER, BTOKEN = "builder", "tok-bld"

BASE = """\
version: 1
defaults:
  audit: {decisions: denied}
actions:
  local: {hosts: ["127.0.0.1"]}
  deploy: {hosts: ["127.0.0.1"], methods: [POST], paths: ["/v2/projects/*/services"]}
"""


def agents() -> str:
    return agents_yaml(
        {
            DEPLOYER: (DTOKEN, ["local", "deploy"]),
            CODER: (CTOKEN, ["local"]),
            BUILDER: (BTOKEN, ["local", "deploy"]),
        },
        deployer="limits:\n  actions:\n    deploy: {max: 3, per: 6h, on_exceed: kill}",
        coder="limits:\n  requests: {max: 3, per: 2s, on_exceed: throttle}",
        builder="limits:\n  actions:\n    deploy: {max: 2, per: 1h, on_exceed: throttle}",
    )


@dataclass
class World:
    proxy: Proxy
    api: Upstream
    tmp: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("limits")
    api = start_upstream()
    rules = make_rules(tmp / "rules", base=BASE, agents=agents())
    proxy = start_proxy(rules, tmp / "state")
    yield World(proxy, api, tmp)
    proxy.stop()
    api.server.shutdown()


def deploys(api: Upstream) -> list[str]:
    return [s.path for s in list(api.seen) if s.method == "POST" and s.path.startswith("/v2/")]


def test_seed_story_52_concurrent_deploys_from_4_replicas_exactly_3_reach_the_api(
    world: World,
) -> None:
    proxy, api = world.proxy, world.api
    outs = [world.tmp / f"replica-{i}.jsonl" for i in range(4)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(HERE / "park_worker.py"),
                str(out),
                f"{api.url}/v2/projects/r{i}-{{i}}/services",
                "13",
                "30",
                "POST",
            ],
            env=proxy.env(DEPLOYER, DTOKEN),
        )
        for i, out in enumerate(outs)
    ]
    for p in procs:
        assert p.wait(60) == 0
    results = [r for out in outs for r in iter_jsonl(out)]
    assert len(results) == 52
    assert len(deploys(api)) == 3  # never more than max, whatever the concurrency
    assert sum(r["status"] == 200 for r in results) == 3
    refused = [r for r in results if r["status"] != 200]
    assert {r["status"] for r in refused} == {403}
    assert {r["decision"] for r in refused} <= {"limit_exceeded", "agent_killed"}
    assert any(r["decision"] == "limit_exceeded" for r in refused)

    # The agent is now killed: every instance's next request of any kind is refused.
    for _ in range(4):
        r = proxy.session(DEPLOYER, DTOKEN).get(f"{api.url}/health", timeout=10)
        assert r.status_code == 403
        assert r.json()["error"] == "agent_killed"
        assert r.json()["by"] == "policy:limits.actions.deploy"
    kills = yaml.safe_load((proxy.rules / "kill.yaml").read_text())["kills"]
    entry = next(k for k in kills if k["agent"] == DEPLOYER)
    assert entry["by"] == "policy:limits.actions.deploy"
    assert entry["reason"] == "limits.actions.deploy: max 3 per 6h reached (3 used)"
    auto = [r for r in proxy.audit_events("agent.auto_killed") if r["agent"] == DEPLOYER]
    assert len(auto) == 1 and auto[0]["rule"] == "limits.actions.deploy"

    status = json.loads(proxy.cli("status", "--json").stdout)
    row = next(r for r in status["agents"] if r["agent"] == DEPLOYER)
    assert row["state"] == "killed"
    assert {"key": "actions.deploy", "used": 3, "max": 3}.items() <= row["limits"][0].items()
    table = proxy.cli("status").stdout
    assert "3/3 per 6h" in table

    proxy.cli("resume", DEPLOYER, "--reason", "fixed the loop")
    assert proxy.session(DEPLOYER, DTOKEN).get(f"{api.url}/health", timeout=10).status_code == 200


def test_throttle_answers_429_with_retry_after_and_the_window_slides(world: World) -> None:
    proxy, api = world.proxy, world.api
    s = proxy.session(CODER, CTOKEN)
    statuses = [s.get(f"{api.url}/t{i}", timeout=10).status_code for i in range(3)]
    assert statuses == [200, 200, 200]
    r = s.get(f"{api.url}/t3", timeout=10)
    assert r.status_code == 429
    assert r.headers["X-Axme-Fw-Decision"] == "limit_exceeded"
    retry = int(r.headers["Retry-After"])
    assert 1 <= retry <= 2
    assert "/t3" not in api.paths("/t3")
    # Throttled, not killed: once the 2 s window slides, requests pass again (the exact
    # Retry-After arithmetic is unit-tested with an injected clock in test_limits.py).
    wait_for(lambda: s.get(f"{api.url}/t4", timeout=10).status_code == 200, 5, "the slide")
    assert not [k for k in proxy.audit_events("agent.auto_killed") if k["agent"] == CODER]
    assert [t for t in proxy.audit_events("limit.throttled") if t["agent"] == CODER]


def test_counts_survive_a_restart_and_a_limit_change_does_not_reset_them(
    world: World, tmp_path: Path
) -> None:
    rules, state = make_rules(tmp_path / "rules", base=BASE, agents=agents()), tmp_path / "state"
    url = f"{world.api.url}/v2/projects/b/services"
    proxy = start_proxy(rules, state)
    try:
        s = proxy.session(BUILDER, BTOKEN)
        assert [s.post(url, timeout=10).status_code for _ in range(2)] == [200, 200]
    finally:
        assert proxy.stop() == 0
    proxy = start_proxy(rules, state)
    try:
        s = proxy.session(BUILDER, BTOKEN)
        r = s.post(url, timeout=10)
        assert r.status_code == 429, "the restart forgot the two deploys"
        # Raise the limit on hot reload: the two deploys still count.
        proxy.edit_rules(
            "agents", agents().replace("deploy: {max: 2, per: 1h", "deploy: {max: 3, per: 1h")
        )
        assert s.post(url, timeout=10).status_code == 200
        assert s.post(url, timeout=10).status_code == 429
    finally:
        proxy.stop()


def test_a_crash_errs_on_the_side_of_refusing(world: World, tmp_path: Path) -> None:
    rules, state = make_rules(tmp_path / "rules", base=BASE, agents=agents()), tmp_path / "state"
    url = f"{world.api.url}/v2/projects/c/services"
    proxy = start_proxy(rules, state)
    try:
        s = proxy.session(BUILDER, BTOKEN)
        assert s.post(url, timeout=10).status_code == 200  # 1 of 2
        # A deploy is made durable at once, not at the next periodic flush.
        wait_for(lambda: "actions.deploy" in (state / "state.json").read_text(), 5, "durable count")
    finally:
        proxy.proc.kill()  # SIGKILL: no clean shutdown, no final flush
        proxy.proc.wait(10)
    proxy = start_proxy(rules, state)
    try:
        # 1 recorded + 1 assumed lost in the last second before the crash = 2 = max.
        r = proxy.session(BUILDER, BTOKEN).post(url, timeout=10)
        assert r.status_code == 429
        assert proxy.audit_events("limits.restored_after_crash")
    finally:
        proxy.stop()


def test_an_auto_kill_holds_while_kill_yaml_is_broken_and_is_written_once_fixed(
    world: World, tmp_path: Path
) -> None:
    rules = make_rules(tmp_path / "rules", base=BASE, agents=agents(), kill="kills: []\n")
    proxy = start_proxy(rules, tmp_path / "state")
    try:
        # Hand-broken: the proxy keeps the last good rules, and the CLI cannot write it.
        (rules / "kill.yaml").write_text("kills:\n  - agent: [broken\n")
        wait_for(lambda: proxy.audit_events("rules.rejected"), 10, "the broken file rejected")
        s = proxy.session(DEPLOYER, DTOKEN)
        url = f"{world.api.url}/v2/projects/k/services"
        assert [s.post(url, timeout=10).status_code for _ in range(4)] == [200, 200, 200, 403]
        wait_for(lambda: proxy.audit_events("agent.auto_kill_unsaved"), 10, "the failed write")
        r = s.get(f"{world.api.url}/still-killed", timeout=10)
        assert r.status_code == 403 and r.json()["error"] == "agent_killed"
        (rules / "kill.yaml").write_text("kills: []\n")  # the operator fixes the file
        wait_for(lambda: "policy:limits" in (rules / "kill.yaml").read_text(), 10, "the retry")
        assert s.get(f"{world.api.url}/still-killed", timeout=10).status_code == 403
        proxy.cli("resume", DEPLOYER)
        assert s.get(f"{world.api.url}/free", timeout=10).status_code == 200
    finally:
        proxy.stop()
