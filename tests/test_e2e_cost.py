"""End to end: spend from real LLM SDK traffic over HTTPS through the proxy; cost ceilings."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import fake_llm
from tests.rig import Proxy, agents_yaml, make_rules, start_proxy, upstream_ca, wait_for

HERE = Path(__file__).parent
PRICES = {  # USD per million tokens
    "test-gpt": {"input": 2.0, "output": 10.0, "cached_input": 1.0, "cache_write": 2.0},
    "test-claude": {"input": 3.0, "output": 15.0, "cached_input": 0.3, "cache_write": 3.75},
    "test-gemini": {"input": 1.0, "output": 4.0, "cached_input": 0.25, "cache_write": 1.0},
}
PRICING = "version: 1\nas_of: '2026-11-01'\nunpriced: deny\nmodels:\n" + "".join(
    f"  {m}: {json.dumps(p)}\n" for m, p in PRICES.items()
)
BASE = """\
version: 1
defaults:
  audit: {decisions: denied}
actions:
  llm: {hosts: ["127.0.0.1"]}
"""


def agents(capped_max: float = 0.05) -> str:
    return agents_yaml(
        {"spender": ("tok-s", ["llm"]), "capped": ("tok-c", ["llm"]), "burst": ("tok-b", ["llm"])},
        capped=(
            f"limits:\n  cost_usd: {{max: {capped_max}, per: 1d, on_exceed: kill, warn_at: 0.5}}"
        ),
        burst="limits:\n  cost_usd: {max: 0.42, per: 1d, on_exceed: throttle}",
    )


def expected_usd(model: str, api: str) -> float:
    """What the fake server's fixed usage costs, from the format's own accounting."""
    u, p = fake_llm.USAGE, PRICES[model]
    cache_write = u["cache_write"] if api == "anthropic" else 0  # only Anthropic reports it
    return (
        u["input"] * p["input"]
        + u["cached"] * p["cached_input"]
        + cache_write * p["cache_write"]
        + u["output"] * p["output"]
    ) / 1e6


@dataclass
class World:
    proxy: Proxy
    fake: fake_llm.Fake


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("cost")
    _ca, server_ctx, ca_pem = upstream_ca(tmp)
    fake = fake_llm.start(server_ctx)
    rules = make_rules(tmp / "rules", base=BASE, agents=agents(), pricing=PRICING)
    proxy = start_proxy(rules, tmp / "state", ca_pem)
    yield World(proxy, fake)
    proxy.stop()
    fake.server.shutdown()


def call(
    world: World, agent: str, token: str, kind: str, model: str, test_id: str
) -> dict[str, Any]:
    res = subprocess.run(
        [sys.executable, str(HERE / "llm_client.py"), kind, world.fake.url, model, test_id],
        env=world.proxy.env(agent, token),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    out: dict[str, Any] = json.loads(res.stdout)
    return out


def usage_records(proxy: Proxy, agent: str) -> list[dict[str, Any]]:
    return [r for r in proxy.audit_events("llm.usage") if r["agent"] == agent]


CASES = [
    ("openai", "test-gpt", "openai"),
    ("openai-stream", "test-gpt", "openai"),
    ("anthropic", "test-claude", "anthropic"),
    ("anthropic-stream", "test-claude", "anthropic"),
    ("gemini", "test-gemini", "gemini"),
    ("gemini-stream", "test-gemini", "gemini"),
]


@pytest.mark.parametrize(("kind", "model", "api"), CASES)
def test_spend_equals_reported_usage_times_prices(
    world: World, kind: str, model: str, api: str
) -> None:
    before = len(usage_records(world.proxy, "spender"))
    out = call(world, "spender", "tok-s", kind, model, f"spend-{kind}")
    assert out["status"] == 200, out
    rec = wait_for(
        lambda: usage_records(world.proxy, "spender")[before:] or None, 10, "the usage record"
    )[0]
    assert rec["model"] == model
    assert rec["partial"] is False
    assert rec["usd"] == pytest.approx(expected_usd(model, api), abs=1e-9)
    assert round(rec["usd"], 2) == round(expected_usd(model, api), 2)  # to the cent
    # The proxy asked for an uncompressed body it can read.
    seen = next(c for c in world.fake.calls if c["id"] == f"spend-{kind}")
    assert seen["accept-encoding"] == "identity"
    if kind == "openai-stream":
        # The SDK did not ask for usage; the proxy did, so the spend is exact.
        assert seen["body"]["stream_options"] == {"include_usage": True}
    if kind.endswith("stream"):
        # Chunk by chunk: the first event reached the client before upstream finished.
        assert out["events"] >= fake_llm.EVENTS
        assert out["first"] < world.fake.finished[f"spend-{kind}"] - 0.2
    # Credentials in the query string (Gemini's ?key=) never reach the audit log.
    assert "AIzaSECRET" not in (world.proxy.state / "audit.jsonl").read_text()


def spent(proxy: Proxy, agent: str) -> float:
    status = json.loads(proxy.cli("status", "--json").stdout)
    row = next(r for r in status["agents"] if r["agent"] == agent)
    return float(next(u["used"] for u in row["limits"] if u["key"] == "cost_usd"))


def test_ceiling_kills_once_crossed_and_refuses_before_sending(world: World) -> None:
    proxy, fake = world.proxy, world.fake
    per_call = expected_usd("test-gpt", "openai")  # 0.0202
    statuses = []
    for i in range(3):  # 0.0202, 0.0404, then 0.0606 > 0.05: crosses, killed
        statuses.append(call(world, "capped", "tok-c", "openai", "test-gpt", f"cap-{i}")["status"])
    assert statuses == [200, 200, 200]
    wait_for(lambda: proxy.audit_events("agent.auto_killed"), 10, "the auto-kill")
    assert [w["agent"] for w in proxy.audit_events("budget.warning")] == ["capped"]
    n = len(fake.calls)
    out = call(world, "capped", "tok-c", "openai", "test-gpt", "cap-after")
    assert out["status"] == 403
    assert out["body"]["error"] == "agent_killed"
    assert out["body"]["by"] == "policy:limits.cost_usd"
    assert len(fake.calls) == n  # refused before it reached the API
    wait_for(lambda: spent(proxy, "capped") == pytest.approx(3 * per_call), 5, "status spend")

    # Raise the ceiling, then resume: calls go through again.
    proxy.edit_rules("agents", agents(capped_max=1.0))
    proxy.cli("resume", "capped", "--reason", "raised the ceiling")
    assert call(world, "capped", "tok-c", "openai", "test-gpt", "cap-resumed")["status"] == 200


def test_20_concurrent_calls_at_95_percent_stay_within_the_documented_bound(world: World) -> None:
    proxy, fake = world.proxy, world.fake
    per_call = expected_usd("test-gpt", "openai")  # 0.0202
    body = {"model": "test-gpt", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2000}
    with httpx.Client(
        proxy=proxy.url("burst", "tok-b"), verify=proxy.ssl_context(), timeout=30
    ) as c:
        for _ in range(20):  # 20 x 0.0202 = 0.404 of 0.42: 96%
            assert c.post(f"{fake.url}/v1/chat/completions", json=body).status_code == 200
    wait_for(lambda: len(usage_records(proxy, "burst")) == 20, 10, "20 usage records")
    before = spent(proxy, "burst")
    assert before / 0.42 > 0.95

    fake.hold = 0.5  # keep every admitted call in flight while the others arrive
    results: list[int] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        with httpx.Client(
            proxy=proxy.url("burst", "tok-b"), verify=proxy.ssl_context(), timeout=30
        ) as c:
            r = c.post(
                f"{fake.url}/v1/chat/completions", json=body, headers={"x-test-id": f"b-{i}"}
            )
        with lock:
            results.append(r.status_code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        fake.hold = 0.0
    admitted = results.count(200)
    assert results.count(429) == 20 - admitted
    assert admitted >= 1
    wait_for(lambda: len(usage_records(proxy, "burst")) == 20 + admitted, 10, "settled")
    expected = before + admitted * per_call
    after = wait_for(
        lambda: (v := spent(proxy, "burst")) == pytest.approx(expected) and v,
        5,
        "status to show it",
    )
    # Bound: spend + reservations < max + one estimate (prompt + max_tokens at list price).
    one_estimate = 2000 * PRICES["test-gpt"]["output"] / 1e6 + 0.001
    assert after < 0.42 + one_estimate
    assert len([c for c in fake.calls if c["id"].startswith("b-")]) == admitted


def test_status_shows_spend_of_an_agent_without_a_ceiling(world: World) -> None:
    expected = sum(r["usd"] for r in usage_records(world.proxy, "spender"))
    assert expected > 0

    def row() -> dict[str, Any] | None:
        status = json.loads(world.proxy.cli("status", "--json").stdout)
        agent = next(r for r in status["agents"] if r["agent"] == "spender")
        return next((u for u in agent["limits"] if u["key"] == "cost_usd"), None)

    spend = wait_for(row, 5, "spend in status")
    assert spend["max"] is None and spend["used"] == pytest.approx(expected)
    assert f"${expected:.2f} per 1d" in world.proxy.cli("status").stdout
