"""A fleet of replicas sharing one Redis, under faults, end to end: real `axme-fw run
--redis` processes, a real redis-server (crashed with SIGKILL, restarted, behind TLS with a
password), real clients (requests, the openai SDK) configured only through proxy settings.

- one kill (``--redis`` CLI or a replica's admin API) refuses 4 instances of one agent on
  3 replicas and cuts their open SSE streams;
- Redis crashes: kills made before stay enforced, shared limits fail closed (or count
  locally with ``on_unavailable: local``), the outage is audited and alerted once per
  replica, and the kill list survives Redis coming back empty;
- ``rediss://`` with a password works, and the password is written nowhere;
- a cost ceiling holds across replicas under 30 concurrent SDK calls;
- a replica SIGKILLed mid-call: its hold lapses (a lease nobody renews), the others go on.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import requests

from tests import fake_llm
from tests.redis_rig import RedisServer, RedisStartError
from tests.rig import (
    AXME_FW,
    Proxy,
    Upstream,
    agents_yaml,
    server_cli,
    start_proxy,
    upstream_ca,
    wait_for,
)
from tests.test_e2e_cost import PRICES, PRICING, expected_usd
from tests.test_e2e_health import Receiver, start_receiver

HERE = Path(__file__).parent
TOKENS = {
    "streamer": "streamer-tok-4c1",
    "bystander": "bystander-tok-0e2",
    "held": "held-tok-8a3",
    "limited": "limited-tok-6f9",
    "free": "free-tok-2d5",
    "spender": "spender-tok-b17",
    "leaser": "leaser-tok-71e",
}
ADMIN = "faults-admin-token-5e3"  # every replica's admin operator (AXME_FW_ADMIN_TOKEN)
CEILING = 0.085  # USD a day: 4 calls (4 x 0.0202 = 0.0808) are 95 % of it
PER_CALL = expected_usd("test-gpt", "openai")
ONE_ESTIMATE = 2000 * PRICES["test-gpt"]["output"] / 1e6 + 0.001  # max_tokens at list price


def base_yaml(hook_port: int | None = None, store: str = "") -> str:
    """No ``events:`` for the webhook: it asks for every event."""
    store_line = f"  store: {{on_unavailable: {store}}}\n" if store else ""
    hook = f"alerts:\n  - webhook: http://127.0.0.1:{hook_port}/hook\n" if hook_port else ""
    return f"""\
version: 1
defaults:
  audit: {{decisions: denied}}
{store_line}{hook}actions:
  any: {{hosts: ["127.0.0.1"]}}
"""


def start_replicas(
    redis_url: str, rules: list[Path], states: list[Path], ca_pem: Path | None = None
) -> list[Proxy]:
    """One `axme-fw run --redis` per (rules, state), started at once; ids r0, r1, ..."""

    def one(i: int) -> Proxy:
        extra = ("--redis", redis_url, "--replica-id", f"r{i}")
        return start_proxy(rules[i], states[i], ca_pem, *extra)

    with ThreadPoolExecutor(len(states)) as pool:
        futures = [pool.submit(one, i) for i in range(len(states))]
    started, errors = [], []
    for f in futures:
        try:
            started.append(f.result())
        except Exception as exc:  # stop the others before failing
            errors.append(exc)
    if errors:
        stop_all(started)
        raise errors[0]
    return started


def stop_all(replicas: list[Proxy]) -> None:
    with ThreadPoolExecutor(max(1, len(replicas))) as pool:
        list(pool.map(Proxy.stop, replicas))


def cli(redis_url: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """`axme-fw --redis URL ...`, with no rules or state of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AXME_FW_")}
    return subprocess.run(
        [AXME_FW, "--redis", redis_url, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def get(p: Proxy, agent: str, url: str) -> requests.Response:
    return p.session(agent, TOKENS[agent]).get(url, timeout=10)


def refusal(r: requests.Response) -> tuple[int, str | None]:
    """(status, the decision the proxy names) of an answer."""
    return r.status_code, r.headers.get("X-Axme-Fw-Decision")


@dataclass
class Fleet:
    redis: RedisServer
    replicas: list[Proxy]
    hooks: Receiver
    fake: fake_llm.Fake
    tmp: Path

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return cli(self.redis.url, *args)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet-faults")
    server = RedisServer(tmp)
    server.start()
    hooks, hook_server = start_receiver()
    _ca, server_ctx, ca_pem = upstream_ca(tmp)
    fake = fake_llm.start(server_ctx)
    rules = tmp / "rules"
    rules.mkdir()
    (rules / "base.yaml").write_text(base_yaml(hooks.port))
    (rules / "pricing.yaml").write_text(PRICING)
    (rules / "agents.yaml").write_text(
        agents_yaml(
            {name: (tok, ["any"]) for name, tok in TOKENS.items()},
            limited="limits:\n  requests: {max: 1000, per: 1m, on_exceed: throttle}",
            spender=f"limits:\n  cost_usd: {{max: {CEILING}, per: 1d, on_exceed: throttle}}",
            leaser="limits:\n  cost_usd: {max: 0.03, per: 1d, on_exceed: throttle}",
        )
    )
    states = [tmp / f"state-{i}" for i in range(3)]
    try:
        with mock.patch.dict(os.environ, {"AXME_FW_ADMIN_TOKEN": ADMIN}):
            replicas = start_replicas(server.url, [rules] * 3, states, ca_pem)
    except BaseException:
        server.stop()
        raise
    yield Fleet(server, replicas, hooks, fake, tmp)
    stop_all(replicas)
    fake.server.shutdown()
    hook_server.shutdown()
    server.stop()


# ---------------------------------------------------------------- 1. streams


@dataclass
class Stream:
    """An SSE stream read in a thread: the time of each event, and whether it ended."""

    session: requests.Session
    url: str
    events: list[float] = field(default_factory=list)
    ended: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)
    error: str = ""

    def __post_init__(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            with self.session.get(self.url, stream=True, timeout=30) as r:
                # Byte by byte: iter_lines' default 512-byte reads would wait ~50 events.
                for line in r.iter_lines(chunk_size=1):
                    if self.stop.is_set():
                        return
                    if line:
                        self.events.append(time.monotonic())
        except requests.RequestException as exc:
            self.error = repr(exc)
        finally:
            self.ended.set()


def change_via(fleet: Fleet, via: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``axme-fw kill|resume …`` through Redis (``cli``) or the admin API of replica 2."""
    if via == "cli":
        return fleet.cli(*args)
    return server_cli(fleet.replicas[1].admin_port, ADMIN, *args)


@pytest.mark.parametrize("via", ["cli", "api"])
def test_one_kill_refuses_4_instances_on_3_replicas_and_cuts_their_streams(
    fleet: Fleet, up: Upstream, via: str
) -> None:
    """The seed: one agent, 4 instances spread over 3 replicas (r0 twice), each holding an
    SSE stream. One kill (``--redis`` CLI, or replica 2's admin API) → every stream cut,
    every instance refused, 3/3 replicas named; resume → every instance back."""
    spread = [fleet.replicas[i] for i in (0, 1, 2, 0)]
    sessions = [p.session("streamer", TOKENS["streamer"]) for p in spread]
    streams = [Stream(s, f"{up.url}/sse") for s in sessions]
    other = Stream(fleet.replicas[0].session("bystander", TOKENS["bystander"]), f"{up.url}/sse")
    try:
        wait_for(
            lambda: all(len(s.events) >= 3 for s in [*streams, other]), 10, "5 streams flowing"
        )
        res = change_via(fleet, via, "kill", "streamer", "--reason", "cut every stream")
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith("killed streamer: enforced by 3/3 replicas in "), res.stdout
        for i, s in enumerate(streams):  # acknowledged means enforced, streams included
            assert s.ended.wait(1.0), f"instance {i}'s stream was not cut within 1 s"
            assert len(s.events) < 400  # cut, not finished (the upstream sends 400)
        n = len(other.events)
        wait_for(lambda: len(other.events) >= n + 3, 5, "the other agent's stream to go on")
        assert not other.ended.is_set(), other.error
        for session in sessions:  # every instance, on its own replica
            r = session.get(f"{up.url}/after-kill", timeout=10)
            assert refusal(r) == (403, "agent_killed")
            assert r.json()["reason"] == "cut every stream"
        for p, at_least in zip(fleet.replicas, (2, 1, 1), strict=True):
            cut = [e for e in p.audit_events("kill.enforced") if e["agent"] == "streamer"]
            assert cut and cut[-1]["flows_cut"] >= at_least, p.audit_events("kill.enforced")
        res = change_via(fleet, via, "resume", "streamer")
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith("resumed streamer: enforced by 3/3 replicas in ")
        for session in sessions:  # acknowledged: no waiting
            assert session.get(f"{up.url}/after-resume", timeout=10).status_code == 200
        again = [Stream(s, f"{up.url}/sse") for s in sessions]
        wait_for(lambda: all(len(s.events) >= 3 for s in again), 10, "4 streams flowing again")
        for s in again:
            s.stop.set()
    finally:
        other.stop.set()
        fleet.cli("resume", "streamer")


# ---------------------------------------------------------------- 4. spend


def burst_worker(
    fleet: Fleet, p: Proxy, prefix: str, n: int, mode: str, tmp: Path
) -> subprocess.Popen[str]:
    args = [sys.executable, str(HERE / "openai_burst.py"), fleet.fake.url, "test-gpt"]
    args += [prefix, str(n), mode]
    if mode == "burst":
        args += [str(tmp / f"{prefix}.ready"), str(tmp / "go")]
    return subprocess.Popen(
        args,
        env=p.env("spender", TOKENS["spender"]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def results_of(proc: subprocess.Popen[str]) -> list[dict[str, Any]]:
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, err
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def usage_events(fleet: Fleet, agent: str) -> list[dict[str, Any]]:
    return [e for p in fleet.replicas for e in p.audit_events("llm.usage") if e["agent"] == agent]


def test_a_cost_ceiling_holds_across_replicas_under_30_concurrent_sdk_calls(
    fleet: Fleet, tmp_path: Path
) -> None:
    fake = fleet.fake
    # About 95 % of the ceiling, one call after another, through r0.
    seq = results_of(burst_worker(fleet, fleet.replicas[0], "seq", 4, "seq", tmp_path))
    assert [r["status"] for r in seq] == [200] * 4, seq
    wait_for(lambda: len(usage_events(fleet, "spender")) == 4, 10, "4 calls settled")
    assert sum(e["usd"] for e in usage_events(fleet, "spender")) / CEILING > 0.95

    # Then 30 at once, 10 through each replica; the fake LLM holds every admitted call
    # 0.5 s, so they are all in flight together.
    workers = [
        burst_worker(fleet, p, f"burst{i}", 10, "burst", tmp_path)
        for i, p in enumerate(fleet.replicas)
    ]
    fake.hold = 0.5
    try:
        ready = [tmp_path / f"burst{i}.ready" for i in range(3)]
        wait_for(lambda: all(f.exists() for f in ready), 30, "3 SDK workers ready")
        (tmp_path / "go").touch()
        calls = [r for w in workers for r in results_of(w)]
    finally:
        fake.hold = 0.0
        for w in workers:
            if w.poll() is None:
                w.kill()
    assert len(calls) == 30
    assert {r["status"] for r in calls} <= {200, 429}, calls
    refused = [r for r in calls if r["status"] == 429]
    assert {(r["decision"], r["error"]) for r in refused} <= {("limit_exceeded", "limit_exceeded")}
    admitted = len(calls) - len(refused)
    assert admitted >= 1

    # What reached the API is exactly what was admitted (the SDK never retried).
    reached = [c for c in fake.calls if c["id"].startswith(("seq-", "burst"))]
    assert len([c for c in reached if c["id"].startswith("burst")]) == admitted
    wait_for(lambda: len(usage_events(fleet, "spender")) == 4 + admitted, 10, "every call settled")
    audited = sum(e["usd"] for e in usage_events(fleet, "spender"))
    # The spend is the fake API's reported usage times the test's prices, call by call.
    assert audited == pytest.approx(len(reached) * PER_CALL, abs=1e-9)
    # The bound, fleet-wide: spend < ceiling + one call's estimate.
    assert audited < CEILING + ONE_ESTIMATE, (audited, admitted)

    # The fleet's status shows the agent's spend against its ceiling.
    res = fleet.cli("status", "--json")
    assert res.returncode == 0, res.stderr
    row = next(a for a in json.loads(res.stdout)["agents"] if a["agent"] == "spender")
    assert "limits" in row, f"no per-agent limits in status --json yet: {row}"
    spend = next(lim for lim in row["limits"] if lim["key"] == "cost_usd")
    assert spend["max"] == CEILING and spend["per"] == 86400.0
    assert spend["on_exceed"] == "throttle"
    assert abs(spend["used"] - audited) < 1e-6, (spend, audited)


def _audited(p: Proxy, event: str, count: int) -> bool:
    return len(p.audit_events(event)) >= count


def outage_seen(replicas: list[Proxy], event: str, count: int) -> None:
    """Wait until every replica audited ``event`` at least ``count`` times."""
    for i, p in enumerate(replicas):
        check = functools.partial(_audited, p, event, count)
        wait_for(check, 10, f"{event} #{count} audited by r{i}")


# ---------------------------------------------------------------- 2. Redis crashes


def test_redis_sigkilled_keeps_kills_fails_closed_audits_once_and_restores_the_kill_list(
    fleet: Fleet, up: Upstream
) -> None:
    res = fleet.cli("kill", "held", "--reason", "before the crash")
    assert res.returncode == 0 and "enforced by 3/3 replicas" in res.stdout, res.stderr
    for p in fleet.replicas:  # the shared limit works while Redis is up
        assert get(p, "limited", f"{up.url}/before").status_code == 200
    before = {p.port: len(p.audit_events("store.down")) for p in fleet.replicas}
    assert before == {p.port: 0 for p in fleet.replicas}

    fleet.redis.crash()
    try:
        for i, p in enumerate(fleet.replicas):
            r = get(p, "held", f"{up.url}/down")
            assert refusal(r) == (403, "agent_killed"), (i, r.text)  # never forgotten
            assert r.json()["reason"] == "before the crash"
            r = get(p, "limited", f"{up.url}/down")
            assert refusal(r) == (503, "store_unavailable"), (i, r.text)
            assert r.json()["error"] == "store_unavailable"
            assert get(p, "free", f"{up.url}/down").status_code == 200, i  # needs no Redis
        outage_seen(fleet.replicas, "store.down", 1)
        for i, p in enumerate(fleet.replicas):  # and still, once every replica knows
            assert refusal(get(p, "held", f"{up.url}/still")) == (403, "agent_killed"), i
            assert refusal(get(p, "limited", f"{up.url}/still")) == (503, "store_unavailable")
            assert get(p, "free", f"{up.url}/still").status_code == 200, i
    finally:
        fleet.redis.start()  # same port, empty: nothing was saved

    outage_seen(fleet.replicas, "store.up", 1)
    # Redis came back empty: the replicas put the kill list back.
    rc = fleet.redis.client(decode_responses=True)
    wait_for(lambda: rc.hget("axfw:kills", "held"), 10, "the kill list restored in Redis")
    for p in fleet.replicas:
        r = get(p, "held", f"{up.url}/after")
        assert refusal(r) == (403, "agent_killed") and r.json()["reason"] == "before the crash"
    wait_for(lambda: len(list(rc.scan_iter("axfw:replica:*"))) == 3, 10, "3 replicas registered")

    def resumed() -> subprocess.CompletedProcess[str] | None:
        out = fleet.cli("resume", "held")
        return out if out.returncode == 0 else None

    res = wait_for(resumed, 10, "a resume every replica acknowledges")
    assert res.stdout.startswith("resumed held: enforced by 3/3 replicas in "), res.stdout
    for p in fleet.replicas:
        assert get(p, "held", f"{up.url}/resumed").status_code == 200
        assert get(p, "limited", f"{up.url}/up-again").status_code == 200
    for i, p in enumerate(fleet.replicas):  # once per outage, not per request or per thread
        assert len(p.audit_events("store.down")) == 1, (i, p.audit_events("store.down"))
        assert len(p.audit_events("store.up")) == 1, (i, p.audit_events("store.up"))
        assert p.audit_events("store.down")[0]["replica"] == f"r{i}"

    # Alerted once per replica (3 replicas: 3 alerts each way), to a webhook that lists no
    # events, i.e. asked for every event.
    def alerts(event: str) -> int:
        return len([e for e in list(fleet.hooks.events) if e["event"] == event])

    try:
        wait_for(lambda: alerts("store.down") >= 3 and alerts("store.up") >= 3, 5, "alerts")
    except AssertionError:
        got = sorted({e["event"] for e in fleet.hooks.events})
        raise AssertionError(
            f"store.down/store.up alerts: {alerts('store.down')}/{alerts('store.up')}, "
            f"want 3/3; the webhook got only {got}"
        ) from None
    assert (alerts("store.down"), alerts("store.up")) == (3, 3)
    # What the fleet shares is alerted once, by one replica: the kill list put back, the
    # kill (made long before the crash) and its resume.
    wait_for(lambda: alerts("agent.resumed") >= 1, 10, "the resume alert")
    assert alerts("store.restored") == 1
    held = [e["event"] for e in list(fleet.hooks.events) if e.get("agent") == "held"]
    assert held == ["agent.killed", "agent.resumed"], held


# ---------------------------------------------------------------- 2b. local fallback


@dataclass
class LocalFleet:
    redis: RedisServer
    replicas: list[Proxy]


@pytest.fixture(scope="module")
def local_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFleet]:
    """2 replicas with ``on_unavailable: local``, each with its own copy of the rules (as
    pods each mount theirs): a kill.yaml written by one is not seen by the other."""
    tmp = tmp_path_factory.mktemp("fleet-local")
    server = RedisServer(tmp)
    server.start()
    agents = agents_yaml(
        {"metered": ("metered-tok-1", ["any"]), "stopper": ("stopper-tok-2", ["any"])},
        metered="limits:\n  requests: {max: 3, per: 1m, on_exceed: throttle}",
        stopper="limits:\n  requests: {max: 2, per: 1m, on_exceed: kill}",
    )
    rules = []
    for i in range(2):
        d = tmp / f"rules-{i}"
        d.mkdir()
        (d / "base.yaml").write_text(base_yaml(store="local"))
        (d / "agents.yaml").write_text(agents)
        rules.append(d)
    try:
        replicas = start_replicas(server.url, rules, [tmp / f"state-{i}" for i in range(2)])
    except BaseException:
        server.stop()
        raise
    yield LocalFleet(server, replicas)
    stop_all(replicas)
    server.stop()


LOCAL_TOKENS = {"metered": "metered-tok-1", "stopper": "stopper-tok-2"}


def lget(p: Proxy, agent: str, url: str) -> requests.Response:
    return p.session(agent, LOCAL_TOKENS[agent]).get(url, timeout=10)


def test_redis_down_with_local_fallback_counts_each_replica_on_its_own(
    local_fleet: LocalFleet, up: Upstream
) -> None:
    r0, r1 = local_fleet.replicas
    assert lget(r0, "metered", f"{up.url}/m").status_code == 200  # 1 of 3, shared
    downs = len(r0.audit_events("store.down"))
    local_fleet.redis.crash()
    try:
        for p in (r0, r1):
            got = [refusal(lget(p, "metered", f"{up.url}/m-{i}")) for i in range(4)]
            # Each replica counts from zero in its own memory: 3 each (documented weaker).
            assert got == [(200, None)] * 3 + [(429, "limit_exceeded")], (p.port, got)
        outage_seen([r0, r1], "store.down", downs + 1)
    finally:
        local_fleet.redis.start()
    outage_seen([r0, r1], "store.up", downs + 1)
    for p in (r0, r1):
        assert len(p.audit_events("store.down")) == downs + 1
    # Shared again: Redis came back empty, so 3 more through both replicas together.
    codes = [lget((r0, r1)[i % 2], "metered", f"{up.url}/s-{i}").status_code for i in range(4)]
    assert codes == [200, 200, 200, 429]


def test_an_auto_kill_made_while_redis_is_down_reaches_the_fleet_when_it_returns(
    local_fleet: LocalFleet, up: Upstream
) -> None:
    r0, r1 = local_fleet.replicas
    ups = len(r0.audit_events("store.up"))
    local_fleet.redis.crash()
    try:
        got = [refusal(lget(r0, "stopper", f"{up.url}/k-{i}")) for i in range(3)]
        # The request over the limit is refused as such; it kills the agent (here).
        assert got == [(200, None), (200, None), (403, "limit_exceeded")], got
        r = lget(r0, "stopper", f"{up.url}/k-after")
        assert refusal(r) == (403, "agent_killed") and r.json()["by"] == "policy:limits.requests"
    finally:
        local_fleet.redis.start()
    outage_seen([r0, r1], "store.up", ups + 1)
    # r1 never saw the agent exceed anything; the kill must reach it through Redis.
    url = local_fleet.redis.url

    def shared() -> bool:
        return "stopper" in json.loads(cli(url, "status", "--json").stdout)["kills"]

    try:
        wait_for(shared, 5, "r0's auto-kill in the shared kill list")
        r = lget(r1, "stopper", f"{up.url}/k-r1")
        assert refusal(r) == (403, "agent_killed"), r.text
    finally:
        cli(url, "resume", "stopper")
        for d in {p.rules for p in (r0, r1)}:
            (d / "kill.yaml").unlink(missing_ok=True)


# ---------------------------------------------------------------- 3. TLS and a password


PASSWORD = "Rp-9fK2xQ7vLm3TzW-redis"  # a test secret that must leak nowhere


def files_with(root: Path, secret: str) -> list[str]:
    return [str(f) for f in root.rglob("*") if f.is_file() and secret.encode() in f.read_bytes()]


def test_rediss_with_a_password_works_and_the_password_is_written_nowhere(
    tmp_path: Path, up: Upstream
) -> None:
    server = RedisServer(tmp_path, password=PASSWORD, tls=True)
    try:
        server.start()
    except RedisStartError as exc:
        if "tls" in str(exc).lower():
            pytest.skip(f"this redis-server has no TLS support: {str(exc).strip()[-200:]}")
        raise
    outputs: list[str] = []

    def run(url: str, *args: str) -> subprocess.CompletedProcess[str]:
        res = cli(url, *args)
        outputs.extend([res.stdout, res.stderr])
        return res

    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "base.yaml").write_text(base_yaml())
    (rules / "agents.yaml").write_text(
        agents_yaml(
            {"held": (TOKENS["held"], ["any"]), "limited": (TOKENS["limited"], ["any"])},
            limited="limits:\n  requests: {max: 1000, per: 1m, on_exceed: throttle}",
        )
    )
    states = [tmp_path / f"state-{i}" for i in range(2)]
    redacted = f"rediss://:****@127.0.0.1:{server.port}/0"
    assert server.url.startswith(f"rediss://:{PASSWORD}@127.0.0.1:{server.port}/0?ssl_ca_certs=")
    try:
        replicas = start_replicas(server.url, [rules] * 2, states)
    except BaseException:
        server.stop()
        raise
    try:
        res = run(server.url, "kill", "held", "--reason", "over TLS")
        assert res.returncode == 0, res.stderr
        assert res.stdout.startswith("killed held: enforced by 2/2 replicas in "), res.stdout
        for p in replicas:
            assert refusal(get(p, "held", f"{up.url}/t")) == (403, "agent_killed")
            assert get(p, "limited", f"{up.url}/t").status_code == 200  # a shared limit, via TLS
        res = run(server.url, "status", "--json")
        assert res.returncode == 0 and json.loads(res.stdout)["kills"] == ["held"], res.stderr
        # A wrong password: refused by Redis, and that password is not echoed either.
        wrong = server.url.replace(PASSWORD, "Wrong-" + PASSWORD[::-1])
        res = run(wrong, "kill", "held")
        assert res.returncode == 1
        assert ("Wrong-" + PASSWORD[::-1]) not in res.stdout + res.stderr
        res = run(server.url, "resume", "held")
        assert res.returncode == 0 and "enforced by 2/2 replicas" in res.stdout, res.stderr

        # Redis unreachable: every error names it redacted.
        server.crash()
        for p in replicas:
            assert refusal(get(p, "limited", f"{up.url}/d")) == (503, "store_unavailable")
        outage_seen(replicas, "store.down", 1)
        for args in (("kill", "held"), ("resume", "held"), ("status", "--json")):
            res = run(server.url, *args)
            assert res.returncode == 1, (args, res.stdout)
            assert res.stderr.startswith(f"axme-fw: cannot reach Redis at {redacted}"), res.stderr
            assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    finally:
        stop_all(replicas)
        server.stop()
    for text in outputs:
        assert PASSWORD not in text, text
    for p in replicas:
        assert PASSWORD not in p.log.read_text(), p.log
        assert redacted in p.log.read_text()  # it did log the outage, redacted
        assert files_with(p.state, PASSWORD) == []
    assert files_with(tmp_path, PASSWORD) == [], "the password is in a file"


def test_a_malformed_redis_url_is_one_error_line_without_the_password() -> None:
    for url in (
        f"rediss://:{PASSWORD}@127.0.0.1:notaport/0",
        f"redis://:{PASSWORD}@127.0.0.1:6379/0?socket_timeout=soon",
    ):
        res = cli(url, "kill", "held")
        assert res.returncode in (1, 2), res
        assert PASSWORD not in res.stdout + res.stderr
        assert res.stderr.startswith("axme-fw: ") and len(res.stderr.splitlines()) == 1, (
            f"not one error line: {res.stderr[-300:]}"
        )


def test_a_replica_killed_mid_call_frees_its_hold_and_the_others_go_on(
    fleet: Fleet, up: Upstream, tmp_path: Path
) -> None:
    """One call's estimate (~$0.021) holds most of a $0.03 ceiling while it runs. Its
    replica dies (SIGKILL) mid-call: nobody renews the lease, so within HOLD_LEASE the
    budget is free again on the other replicas; meanwhile they serve everyone else."""
    import httpx
    import redis

    from axme_fw.redis_ops import HOLD_LEASE

    ca_pem = fleet.tmp / "upstream-ca.pem"
    rules = fleet.tmp / "rules"
    extra = ("--redis", fleet.redis.url, "--replica-id", "doomed")
    doomed = start_proxy(rules, tmp_path / "doomed", ca_pem, *extra)
    body = {"model": "test-gpt", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2000}
    url = f"{fleet.fake.url}/v1/chat/completions"

    def call(p: Proxy, tag: str) -> int:
        proxy = p.url("leaser", TOKENS["leaser"])
        with httpx.Client(proxy=proxy, verify=p.ssl_context(), timeout=60) as c:
            try:
                return c.post(url, json=body, headers={"x-test-id": tag}).status_code
            except httpx.HTTPError:
                return -1  # the replica died under it

    holds = redis.Redis(port=fleet.redis.port, decode_responses=True)
    hk = "axfw:h:leaser:cost_usd"
    fleet.fake.hold = 60.0
    pool = ThreadPoolExecutor(1)
    try:
        in_flight = pool.submit(call, doomed, "doomed-call")
        wait_for(lambda: holds.hlen(hk) == 1, 10, "the doomed replica's hold in Redis")
        doomed.proc.kill()  # SIGKILL: no shutdown, no release, no settle
        doomed.proc.wait(10)
        fleet.fake.hold = 0.0
        assert in_flight.result(60) == -1
        killed_at = time.monotonic()
        r0 = fleet.replicas[0]
        assert call(r0, "while-held") == 429  # the dead replica's hold still counts
        assert get(r0, "free", f"{up.url}/others").status_code == 200  # the others go on
        wait_for(lambda: call(r0, "after-lapse") == 200, HOLD_LEASE + 15, "the hold to lapse")
        assert time.monotonic() - killed_at < HOLD_LEASE + 15
        wait_for(lambda: holds.hlen(hk) == 0, 10, "nothing held (lapsed; the new call settled)")

        # The dead replica's heartbeat expired with it. It may as well be cut off from
        # Redis and still serving on the list it last read: a kill names it, and fails.
        wait_for(lambda: not holds.exists("axfw:replica:doomed"), 10, "the heartbeat gone")
        res = fleet.cli("kill", "free")
        assert res.returncode == 1, res.stdout
        assert "enforced by 3/4 replicas" in res.stderr
        assert "doomed (no heartbeat for " in res.stderr
        status = json.loads(fleet.cli("status", "--json").stdout)
        lost = [r for r in status["replicas"] if r["replica"] == "doomed"]
        assert lost and lost[0]["lost"] and not lost[0]["in_sync"]
        holds.hdel("axfw:replicas", "doomed")  # as LOST_WINDOW passing would
        res = fleet.cli("resume", "free")
        assert res.returncode == 0 and "enforced by 3/3 replicas" in res.stdout, res.stderr
    finally:
        fleet.fake.hold = 0.0
        pool.shutdown(wait=False)
        doomed.stop()
