"""RedisStore against a real redis-server: atomic windows across stores (replicas), the
running sums against the in-memory oracle, holds that lease, settle once and lapse."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from axme_fw.limits import Exceeded, LimitSpec, OnExceed, Reservation, Windows
from axme_fw.meter import Spent
from axme_fw.redis_ops import HOLD_LEASE, redact
from axme_fw.redis_store import RedisStore
from tests.redis_rig import RedisServer

DEPLOY = LimitSpec("actions.deploy", 50, 3600.0, OnExceed.KILL)
COST = LimitSpec("cost_usd", 1.0, 3600.0, OnExceed.KILL, warn_at=0.5)
NOW = 1_000_000.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    s = RedisServer(tmp_path_factory.mktemp("redis"))
    s.start()
    yield s
    s.stop()


@pytest.fixture
def stores(server: RedisServer, tmp_path: Path) -> Iterator[tuple[RedisStore, RedisStore]]:
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

    async def run() -> None:
        got = await asyncio.gather(
            *((a if i % 2 else b).admit("deployer", [DEPLOY], NOW) for i in range(200))
        )
        assert sum(g is None for g in got) == 50
        ex = await a.admit("deployer", [DEPLOY], NOW)
        assert isinstance(ex, Exceeded) and ex.used == 50 and 0 < ex.retry_after <= 3600
        assert await b.read_used([("deployer", DEPLOY.key, DEPLOY.per)], NOW) == [50]
        assert await a.admit("deployer", [DEPLOY], NOW + 3601) is None  # the window moved on

    asyncio.run(run())


def test_running_sums_agree_with_the_in_memory_windows(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    """The Lua cursors against Windows (the oracle) on a random walk: two windows on one
    key, then a third length appearing mid-way (a rules change); amounts with fractions."""
    a, _ = stores
    minute = LimitSpec("requests", 30, 60.0, OnExceed.THROTTLE)
    hour = LimitSpec("requests", 200, 3600.0, OnExceed.THROTTLE)
    ten = LimitSpec("requests", 90, 600.0, OnExceed.THROTTLE)
    oracle, rng = Windows(), random.Random(7)

    async def run() -> None:
        now = NOW
        for i in range(600):
            now += rng.choice([0.0, 0.5, 1.0, 3.0, 7.0, 45.0])
            specs = [minute, hour] if i < 300 else [minute, hour, ten]
            amount = rng.choice([1.0, 1.0, 2.5, 0.25])
            want = oracle.admit("w", specs, now, amount)
            got = await a.admit("w", specs, now, amount)
            assert (got is None) == (want is None), (i, got, want)
            if got is not None and want is not None:
                assert got.spec == want.spec and got.used == pytest.approx(want.used)
                assert got.retry_after == pytest.approx(want.retry_after)
        asked = [("w", "requests", s.per) for s in (minute, hour, ten)]
        used = await a.read_used(asked, now)
        assert used == pytest.approx([oracle.used("w", "requests", p, now) for *_, p in asked])

    asyncio.run(run())


def test_holds_are_shared_settle_once_and_lapse_when_not_renewed(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    a, b = stores

    async def run() -> None:
        first = await a.reserve("llm", COST, 0.6, NOW)
        assert isinstance(first, Reservation)
        assert isinstance(await b.reserve("llm", COST, 0.6, NOW), Exceeded)  # held elsewhere
        assert await a.settle("llm", COST, 0.3, NOW, first) == Spent(0.3, False)
        again = await a.settle("llm", COST, 0.3, NOW, first)  # retried: never charged twice
        assert again.used == pytest.approx(0.3)
        held = await b.reserve("llm", COST, 0.6, NOW)
        assert isinstance(held, Reservation)
        # A replica that died with a hold stops renewing it: the lease lapses.
        assert isinstance(await a.reserve("llm", COST, 0.6, NOW + 1), Exceeded)
        later = NOW + HOLD_LEASE + 1
        late = await a.reserve("llm", COST, 0.6, later)
        assert isinstance(late, Reservation)
        # ... and a settle that comes after its lease ran out still charges (never free).
        spent = await b.settle("llm", COST, 0.25, later, held)
        assert spent.used == pytest.approx(0.55) and spent.warned  # passed 50%: once
        assert not (await a.settle("llm", COST, 0.0, later, late)).warned

    asyncio.run(run())


def test_a_lone_call_may_overshoot_by_its_own_estimate_only(
    stores: tuple[RedisStore, RedisStore],
) -> None:
    a, b = stores

    async def run() -> None:
        big = await a.reserve("solo", COST, 5.0, NOW)  # nothing held or spent: it may go
        assert isinstance(big, Reservation)
        await a.settle("solo", COST, 1.5, NOW, big)
        assert isinstance(await b.reserve("solo", COST, 0.01, NOW), Exceeded)  # at the ceiling

    asyncio.run(run())


def test_the_password_never_reaches_a_log() -> None:
    assert redact("redis://:hunter2@10.0.0.5:6379/0") == "redis://:****@10.0.0.5:6379/0"
    assert redact("rediss://u:p@h:1/2") == "rediss://u:****@h:1/2"
    assert redact("redis://h:1/0") == "redis://h:1/0"


def test_a_live_replica_renews_its_holds_each_beat(stores: tuple[RedisStore, RedisStore]) -> None:
    """A call longer than the lease keeps its hold while its replica lives."""
    import time

    a, b = stores

    async def run() -> None:
        now = time.time()
        held = await a.reserve("long", COST, 0.6, now - HOLD_LEASE + 1)  # lapses in 1 s
        assert isinstance(held, Reservation)
        await a._beat()  # what the watcher does every second
        assert isinstance(await b.reserve("long", COST, 0.6, now + 5), Exceeded)  # renewed
        await a.settle("long", COST, 0.1, now + 5, held)
        await a._beat()  # a settled hold is not brought back
        assert isinstance(await b.reserve("long", COST, 0.6, now + 5), Reservation)

    asyncio.run(run())
