"""The spend meter: reserve before sending, settle after, the overshoot bound; over a
LocalStore (the RedisStore runs the same meter: tests/test_redis_store.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from axme_fw.cost import ApiKind, Price, Pricing, Usage
from axme_fw.limits import LimitSpec, OnExceed
from axme_fw.meter import TRACK, Call, Meter, Refused, Settled, usage_rows
from axme_fw.store import LocalStore

PRICES = Pricing({"m": Price(2.0, 10.0, 1.0, 2.5)}, "deny", "2026-11-01")
SPEC = LimitSpec("cost_usd", 1.0, 86400.0, OnExceed.KILL, warn_at=0.5)


def body(max_tokens: int = 2000, model: str = "m") -> bytes:
    return json.dumps({"model": model, "messages": [], "max_tokens": max_tokens}).encode()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LocalStore]:
    made = LocalStore(tmp_path / "state", tmp_path / "rules", lambda *a, **k: None)
    yield made
    made.discard()


def begin(meter: Meter, spec: LimitSpec | None = SPEC, model: str = "m") -> Call | Refused:
    return asyncio.run(
        meter.begin("a", ApiKind.OPENAI_CHAT, "/v1/chat/completions", body(model=model), spec, 0.0)
    )


def settle(meter: Meter, call: Call, usage: Usage | None, sent: bool, now: float) -> Settled:
    return asyncio.run(meter.settle(call, usage, sent, now))


def test_reserve_then_settle_replaces_the_estimate_by_the_real_cost(store: LocalStore) -> None:
    w = store.windows
    meter = Meter(store, PRICES)
    call = begin(meter)
    assert isinstance(call, Call)
    assert call.estimate_usd == pytest.approx((len(body()) + 3) // 4 * 2e-6 + 2000 * 10e-6)
    assert w.reserved("a", "cost_usd") == pytest.approx(call.estimate_usd)
    done = settle(meter, call, Usage("m", 1000, 100), True, 1.0)
    assert done.usd == pytest.approx((1000 * 2 + 100 * 10) / 1e6)
    assert w.reserved("a", "cost_usd") == 0
    assert w.used("a", "cost_usd", 86400.0, 1.0) == pytest.approx(done.usd)
    assert settle(meter, call, Usage("m", 1, 1), True, 2.0).usd == 0  # never twice


def test_at_the_ceiling_a_call_is_refused_before_it_is_sent(store: LocalStore) -> None:
    w = store.windows
    meter = Meter(store, PRICES)
    w.admit("a", [SPEC], 0.0, 1.0)  # spent the whole dollar
    got = begin(meter)
    assert isinstance(got, Refused) and got.reason == "limit_exceeded"
    assert got.exceeded is not None and got.exceeded.spec is SPEC


def test_concurrent_reservations_stay_within_max_plus_one_estimate(store: LocalStore) -> None:
    w = store.windows
    meter = Meter(store, PRICES)
    w.admit("a", [SPEC], 0.0, 0.95)
    calls = [begin(meter) for _ in range(20)]
    admitted = [c for c in calls if isinstance(c, Call)]
    one = admitted[0].estimate_usd
    assert 1 <= len(admitted) < 20
    assert 0.95 + sum(c.estimate_usd for c in admitted) < 1.0 + one  # the documented bound
    for c in admitted:  # each costs exactly its estimate: the worst case
        settle(meter, c, Usage("m", c.estimate.input_tokens_est, 2000), True, 1.0)
    assert w.used("a", "cost_usd", 86400.0, 1.0) < 1.0 + one


@pytest.mark.parametrize(
    ("usage", "sent", "charged"),
    [
        (None, False, 0.0),  # never sent (or an error answer): free
        (None, True, "prompt"),  # sent, no usage seen: the prompt estimate, partial
        (Usage("m", 10, 5, partial=True), True, (10 * 2 + 5 * 10) / 1e6),  # cut stream
    ],
)
def test_a_broken_call_is_never_silently_free(
    store: LocalStore, usage: Usage | None, sent: bool, charged: object
) -> None:
    w = store.windows
    meter = Meter(store, PRICES)
    call = begin(meter)
    assert isinstance(call, Call)
    done = settle(meter, call, usage, sent, 1.0)
    if charged == "prompt":
        assert done.usage is not None and done.usage.partial
        assert done.usd == pytest.approx(call.estimate.input_tokens_est * 2e-6)
    else:
        assert done.usd == pytest.approx(charged)
    assert w.reserved("a", "cost_usd") == 0


def test_unpriced_models_follow_unpriced_and_no_pricing_file_refuses_capped_agents(
    store: LocalStore,
) -> None:
    assert isinstance(begin(Meter(store, PRICES), model="other"), Refused)
    allow = Pricing(PRICES.prices, "allow", "2026-11-01")
    call = begin(Meter(store, allow), model="other")
    assert isinstance(call, Call) and call.estimate_usd == 0
    refused = begin(Meter(store, None))
    assert isinstance(refused, Refused) and refused.reason == "model_unpriced"
    assert isinstance(begin(Meter(store, None), spec=None), Call)  # no ceiling: passes


def test_crossing_the_ceiling_and_the_warning_are_reported_once(store: LocalStore) -> None:
    meter = Meter(store, PRICES)
    warnings = []
    crossed = []
    for i in range(5):
        call = begin(meter)
        assert isinstance(call, Call)
        done = settle(meter, call, Usage("m", 0, 30_000), True, float(i))  # $0.30 each
        warnings.append(done.warn)
        crossed.append(done.crossed is not None)
        if done.crossed:
            break
    assert warnings == [False, True, False, False]
    assert crossed == [False, False, False, True]


def test_spend_without_a_ceiling_is_tracked_and_reported(store: LocalStore) -> None:
    meter = Meter(store, PRICES)
    call = begin(meter, spec=None)
    assert isinstance(call, Call)
    settle(meter, call, Usage("m", 1_000_000, 0), True, 1.0)
    rows = usage_rows(store, "a", [], 1.0)
    assert rows == [
        {
            "key": TRACK.key,
            "used": pytest.approx(2.0),
            "max": None,
            "per": TRACK.per,
            "on_exceed": None,
        }
    ]
    assert usage_rows(store, "b", [], 1.0) == []
