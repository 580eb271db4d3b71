"""RedisStore against a real redis-server: atomic windows across stores (replicas),
reservations that hold, settle once and expire. No event loop needed: decisions are
synchronous store calls."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from axme_fw.limits import Exceeded, LimitSpec, OnExceed, Reservation
from axme_fw.redis_store import RESERVATION_TTL, RedisStore, redact
from tests.redis_rig import RedisServer

DEPLOY = LimitSpec("actions.deploy", 50, 3600.0, OnExceed.KILL)
COST = LimitSpec("cost_usd", 1.0, 3600.0, OnExceed.KILL)
NOW = 1_000_000.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    s = RedisServer(tmp_path_factory.mktemp("redis"))
    s.start()
    yield s
    s.stop()


@pytest.fixture
def stores(server: RedisServer, tmp_path: Path) -> Iterator[tuple[RedisStore, RedisStore]]:
    import redis

    redis.Redis(port=server.port).flushall()
    made = tuple(
        RedisStore(server.url, name, tmp_path / name, tmp_path / "rules", lambda *a, **k: None)
        for name in ("a", "b")
    )
    yield made  # type: ignore[misc]
    for s in made:
        s.close()


def test_admit_is_atomic_across_replicas(stores: tuple[RedisStore, RedisStore]) -> None:
    a, b = stores

    def one(i: int) -> bool:
        return (a if i % 2 else b).admit("deployer", [DEPLOY], NOW) is None

    with ThreadPoolExecutor(16) as pool:
        admitted = sum(pool.map(one, range(200)))
    assert admitted == 50
    ex = a.admit("deployer", [DEPLOY], NOW)
    assert isinstance(ex, Exceeded) and ex.used == 50 and 0 < ex.retry_after <= 3600
    assert b.used("deployer", DEPLOY.key, DEPLOY.per, NOW) == 50
    assert a.admit("deployer", [DEPLOY], NOW + 3601) is None  # the window moved on


def test_reservations_hold_across_replicas_settle_once_and_expire(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    a, b = stores
    first = a.reserve("llm", COST, 0.6, NOW)
    assert isinstance(first, Reservation)
    assert isinstance(b.reserve("llm", COST, 0.6, NOW), Exceeded)  # 0.6 held elsewhere
    a.settle(first, 0.3, NOW)
    a.settle(first, 0.3, NOW)  # a retried settle never charges twice
    assert b.used("llm", COST.key, COST.per, NOW) == pytest.approx(0.3)
    held = b.reserve("llm", COST, 0.6, NOW)
    assert isinstance(held, Reservation)
    # A replica that died with a hold: after RESERVATION_TTL the budget is free again.
    later = NOW + RESERVATION_TTL + 1
    assert isinstance(a.reserve("llm", COST, 0.6, later), Reservation)


def test_a_lone_call_may_overshoot_by_its_own_estimate_only(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    a, b = stores
    big = a.reserve("solo", COST, 5.0, NOW)  # nothing else held, nothing spent: it may go
    assert isinstance(big, Reservation)
    a.settle(big, 1.5, NOW)
    assert isinstance(b.reserve("solo", COST, 0.01, NOW), Exceeded)  # at the ceiling now


def test_the_password_never_reaches_a_log() -> None:
    assert redact("redis://:hunter2@10.0.0.5:6379/0") == "redis://:****@10.0.0.5:6379/0"
    assert redact("rediss://u:p@h:1/2") == "rediss://u:****@h:1/2"
    assert redact("redis://h:1/0") == "redis://h:1/0"
