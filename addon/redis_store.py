"""State: :class:`RedisStore`, the :class:`~axme_fw.store.Store` that N replicas share.

Every call on the proxy's loop is awaited on an asyncio Redis client: a replica waiting on
Redis keeps serving every other flow. What lives where is :mod:`axme_fw.redis_ops`.

- **Limits and spend**: check-and-record (:meth:`admit`), check-and-hold
  (:meth:`reserve`) and replace-a-hold-by-the-real-cost (:meth:`settle`) are one Lua
  script each: atomic across replicas, one round trip. A hold is a lease this replica
  renews every second while its call runs; a replica that dies stops renewing, and its
  holds are dropped ``HOLD_LEASE`` later. A settle is recorded under the hold's id, so a
  retried one never charges twice.
- **The kill list**: one watcher task subscribes to the kill channel, re-reads the list on
  every message and every second (the backstop for a missed message), applies it and
  acknowledges the revision it enforces. It also beats (the replica's heartbeat key and
  its published health and limits), renews leases and refreshes the spend it shows.
- **Faults**: the first error marks the store down (audited and alerted once). While it
  is down no decision waits on Redis: known kills stay in force, agents without limits
  flow, a limit or ceiling is refused 503 ``store_unavailable`` (``defaults.store.
  on_unavailable: refuse``) or counted in this replica's memory (``local``). Spend
  settled meanwhile is kept and sent once Redis is back. The watcher reconnects, re-reads
  the kill list (putting it back if Redis came back empty) and only then marks the store
  up. A replica that never read the list is not ready and serves nothing.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio as aioredis

from . import redis_ops as ops
from .background import spawn
from .health import Health
from .health import merge as merge_health
from .limits import Exceeded, LimitSpec, Reservation
from .meter import Spent
from .ruleset import Kill, Ruleset
from .store import Audit, LocalStore, StoreUnavailable

if TYPE_CHECKING:
    from .firewall import Firewall

log = logging.getLogger(__name__)

TIMEOUT = 0.5  # s: the longest a decision waits on Redis before it is refused
BEAT = 1.0  # s: heartbeat, kill-list re-read, lease renewal, spend refresh
FAULTS = (redis.RedisError, OSError, asyncio.TimeoutError)
MAX_UNSENT = 100_000  # settlements kept while Redis is down


def _kills_of(raw: Any) -> tuple[int, tuple[Kill, ...]]:
    rev, entries = raw
    return int(rev or 0), ops.parse_kills(entries)


class RedisStore(LocalStore):
    """Limits, spend and the kill list in Redis; health and snapshots as LocalStore (and
    shared for the fleet's status and staleness)."""

    replica: str

    def __init__(
        self,
        url: str,
        replica: str,
        state_dir: Path,
        rules_dir: Path,
        audit: Audit,
        on_unavailable: Callable[[], str] = lambda: "refuse",
    ) -> None:
        super().__init__(state_dir, rules_dir, audit)
        self.url, self.replica = url, replica
        self._on_unavailable = on_unavailable
        self.r = aioredis.Redis.from_url(
            url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT, decode_responses=True
        )
        self._admit = self.r.register_script(ops.ADMIT)
        self._reserve = self.r.register_script(ops.RESERVE)
        self._settle = self.r.register_script(ops.SETTLE)
        self._used_script = self.r.register_script(ops.USED)
        self._renew = self.r.register_script(ops.RENEW)
        self._restore = self.r.register_script(ops.RESTORE)
        self._ids = itertools.count(int.from_bytes(os.urandom(6), "big") << 16)
        self.revision = -1  # the Redis kill-list revision applied; -1: never loaded
        self.redis_kills: tuple[Kill, ...] = ()
        self.down = False
        self.on_kills: Callable[[], None] = lambda: None  # the addon re-installs the rules
        self.on_store_event: Callable[[str, dict[str, Any]], None] = lambda e, f: audit(
            e, replica=replica, **f
        )
        self._pending_redis: dict[str, Kill] = {}  # auto-kills not yet in Redis
        self._holds: dict[int, Reservation] = {}  # open holds in Redis: leases to renew
        self._local_holds: set[int] = set()  # held in memory while Redis was down
        self._unsent: collections.deque[tuple[str, LimitSpec, float, float, int]] = (
            collections.deque(maxlen=MAX_UNSENT)
        )
        self._used: dict[tuple[str, str, float], float] = {}  # shown spend, per beat
        self._known_agents: set[str] = set()
        self._fleet = Health()  # every replica's health, merged (refreshed per beat)
        self._published = "{}"
        self.listen: list[str] = []
        self._watcher: asyncio.Task[None] | None = None
        self._woken = asyncio.Event()
        try:  # blocking, before traffic: a replica serves nothing before it knows the kills
            with ops.connect(url, TIMEOUT) as r:
                self.revision, self.redis_kills = ops.read_kills(r)
        except redis.RedisError as exc:
            # A warning: an ERROR at start-up makes mitmproxy exit, and a replica must
            # wait for Redis (not ready, serving nothing) rather than crash-loop.
            log.warning("axme-fw: Redis %s unreachable at start: %s", ops.redact(url), exc)
            self.down = True

    def ready(self) -> bool:
        return self.revision >= 0

    # ------------------------------------------------------------ limits and spend

    def _fallback(self, exc: BaseException | None) -> None:
        """Redis cannot answer: return to count in this replica's memory (``local``), else
        raise StoreUnavailable (``refuse``: the request gets 503)."""
        if exc is not None:
            self._mark_down(exc)
        if self._on_unavailable() != "local":
            why = str(exc) if exc is not None else "unreachable; reconnecting"
            raise StoreUnavailable(why or type(exc).__name__)

    async def admit(
        self, agent: str, specs: Sequence[LimitSpec], now: float, amount: float = 1.0
    ) -> Exceeded | None:
        if not self.down:
            keys: list[str] = []
            args: list[Any] = [now, amount, next(self._ids)]
            recorded: set[str] = set()
            for s in specs:
                keys += ops.window_keys(agent, s.key)
                args += [s.max, s.per, 0 if s.key in recorded else 1]
                recorded.add(s.key)
            try:
                got = await self._admit(keys=keys, args=args)
            except FAULTS as exc:
                self._fallback(exc)
            else:
                self._known_agents.add(agent)
                if int(got[0]) == 0:
                    return None
                return Exceeded(specs[int(got[0]) - 1], float(got[1]), max(0.0, float(got[2])))
        else:
            self._fallback(None)
        return await super().admit(agent, specs, now, amount)

    async def reserve(
        self, agent: str, spec: LimitSpec, amount: float, now: float
    ) -> Reservation | Exceeded:
        if not self.down:
            res = Reservation(next(self._ids), agent, spec, amount)
            args = [now, amount, spec.max, spec.per, res.id, ops.HOLD_LEASE]
            try:
                got = await self._reserve(keys=ops.window_keys(agent, spec.key), args=args)
            except FAULTS as exc:
                self._fallback(exc)
            else:
                self._known_agents.add(agent)
                if int(got[0]) == 0:
                    return Exceeded(spec, float(got[1]), max(0.0, float(got[2])))
                self._holds[res.id] = res
                return res
        else:
            self._fallback(None)
        held = self.windows.reserve(agent, spec, amount, now)
        if isinstance(held, Reservation):
            self._local_holds.add(held.id)
        return held

    async def settle(
        self,
        agent: str,
        spec: LimitSpec,
        actual: float,
        now: float,
        reservation: Reservation | None = None,
    ) -> Spent:
        if not (math.isfinite(actual) and actual >= 0):
            actual = reservation.amount if reservation is not None else 0.0
        here = None
        if reservation is not None and reservation.id in self._local_holds:
            # Held in memory while Redis was down: settled here, charged to Redis below.
            self._local_holds.discard(reservation.id)
            here = await super().settle(agent, spec, actual, now, reservation)
            reservation = None
        if reservation is not None:
            self._holds.pop(reservation.id, None)
        rid = reservation.id if reservation is not None else next(self._ids)
        self._changed()
        if not self.down:
            try:
                return await self._send_settle(agent, spec, actual, now, rid)
            except FAULTS as exc:
                self._mark_down(exc)
        if len(self._unsent) == MAX_UNSENT:
            log.error("axme-fw: %d settlements wait for Redis: the oldest is dropped", MAX_UNSENT)
        self._unsent.append((agent, spec, actual, now, rid))  # sent once Redis is back
        return here if here is not None else await super().settle(agent, spec, actual, now)

    async def _send_settle(
        self, agent: str, spec: LimitSpec, actual: float, now: float, rid: int
    ) -> Spent:
        ev, st, hk = ops.window_keys(agent, spec.key)
        warned = f"{ops.P}warned:{agent}:{spec.key}"
        level = spec.warn_at * spec.max if spec.warn_at is not None else -1
        args = [now, rid, actual, spec.per, level]
        got = await self._settle(keys=[ev, st, hk, warned], args=args)
        used = float(got[0])
        self._used[(agent, spec.key, spec.per)] = used
        return Spent(used, bool(int(got[1])))

    def release(self, reservation: Reservation) -> None:
        if reservation.id in self._local_holds:
            self._local_holds.discard(reservation.id)
            self.windows.release(reservation)
            return
        if self._holds.pop(reservation.id, None) is None:
            return
        hk = ops.window_keys(reservation.agent, reservation.spec.key)[2]
        spawn(self._quiet(self.r.hdel(hk, str(reservation.id))), "releasing a hold")

    def used(self, agent: str, key: str, per: float, now: float) -> float:
        """As read from Redis at the last beat or settlement (status is for people)."""
        got = self._used.get((agent, key, per))
        if got is None:
            self._used[(agent, key, per)] = 0.0  # read at the next beat
            return self.windows.used(agent, key, per, now)
        return got

    async def read_used(self, asked: list[tuple[str, str, float]], now: float) -> list[float]:
        """Recorded use of each (agent, key, per) window, read from Redis in one call."""
        keys = [k for a, key, _per in asked for k in ops.window_keys(a, key)[:2]]
        got = await self._used_script(keys=keys, args=[now, *[per for *_, per in asked]])
        return [float(x) for x in got]

    def agents(self) -> list[str]:
        return sorted(self._known_agents | set(super().agents()))

    # ------------------------------------------------------------ kill list

    def kills(self, rules: Ruleset) -> tuple[Kill, ...]:
        """The Redis kill list, plus auto-kills not in it yet (and LocalStore's)."""
        have = {k.agent for k in self.redis_kills}
        for agent in [a for a in self._pending_redis if a in have]:
            del self._pending_redis[agent]
        return (*self._pending_redis.values(), *self.redis_kills, *super().kills(rules))

    def kill(self, kill: Kill) -> None:
        """An auto-kill: held here at once, written to Redis for every replica, and to
        kill.yaml when Redis cannot take it."""
        self._pending_redis[kill.agent] = kill
        spawn(self._share_kill(kill), f"sharing the auto-kill of {kill.agent}")

    async def change(
        self, agent: str, kill: Kill | None, wait: float
    ) -> tuple[int, list[str], list[str], float]:
        """The admin API's kill (or resume: None), on the loop: one atomic write with a
        new revision, applied here at once, then up to ``wait`` s for every replica's
        acknowledgement, as :func:`~axme_fw.redis_ops.change_and_wait`. Raises what Redis
        raises."""
        started = time.monotonic()
        rev = await self._write_shared(agent, kill)
        await self._sync()  # this replica enforces it now, not at its pub/sub message
        while True:
            async with self.r.pipeline(transaction=False) as p:
                p.hgetall(ops.ACKS)
                p.hgetall(ops.REGISTRY)
                acks, registry = await p.execute()
            keys = [ops.P + "replica:" + rid for rid in registry]
            beats = await self.r.mget(keys) if keys else []
            known, _gone = ops.classify(acks, registry, beats, time.time())
            behind = ops.waited(known, rev)
            if not behind or time.monotonic() - started >= wait:
                return rev, sorted(known), behind, (time.monotonic() - started) * 1000
            await asyncio.sleep(0.002)

    async def _write_shared(self, agent: str, kill: Kill | None) -> int:
        async with self.r.pipeline(transaction=True) as p:
            if kill is None:
                p.hdel(ops.KILLS, agent)
            else:
                p.hset(ops.KILLS, agent, ops.kill_json(kill))
            p.incr(ops.REVISION)
            rev = int((await p.execute())[-1])
        await self.r.publish(ops.CHANNEL, str(rev))
        return rev

    async def _share_kill(self, kill: Kill) -> None:
        if self.down:
            super().kill(kill)  # kill.yaml now; Redis when it is back (_reconnected)
            return
        try:
            await self._write_shared(kill.agent, kill)
        except FAULTS as exc:
            log.error("axme-fw: auto-kill of %s not in Redis (%s): kill.yaml", kill.agent, exc)
            self._mark_down(exc)
            super().kill(kill)

    def ack(self, enforced: Any) -> None:
        super().ack({**dict(enforced), "redis_revision": self.revision, "replica": self.replica})
        listen = list(enforced.get("listen") or [])
        if listen != self.listen:
            self.listen = listen
            self._woken.set()  # beat now: status shows where this replica listens
        if self.revision >= 0 and self.loop is not None:
            ack = self.r.hset(ops.ACKS, self.replica, self.revision)
            spawn(self._quiet(ack), "acknowledging the kill list")

    def fleet_view(self) -> dict[str, Any]:
        """Every replica and agent as Redis holds them (:func:`axme_fw.fleet_view.view`).
        Blocking: for a worker thread (the admin API's status), never the loop."""
        from .fleet_view import view

        with ops.connect(self.url, 2.0) as r:
            return view(r, time.time())

    # ------------------------------------------------------------ health, fleet-wide

    def publish_live(self, live: Any) -> None:
        """Also share this replica's health and limits: status and staleness see the fleet."""
        super().publish_live(live)
        shared = {"health": live.get("health") or {}, "limits": live.get("limits") or {}}
        self._published = json.dumps({**shared, "replica": self.replica, "at": time.time()})

    def sweep(self, now: float, stale_after: Callable[[str], float]) -> list[str]:
        """Agents this replica stopped seeing, unless another replica saw them lately."""
        return [
            agent
            for agent in super().sweep(now, stale_after)
            if (seen := self._fleet.agents.get(agent)) is None
            or now - seen.last >= stale_after(agent)
        ]

    def claim(self, event: str, subject: str, then: Callable[[], None]) -> None:
        """Once for the fleet. ``agent.stale``: the replica that sets ``stale:AGENT`` first
        reports; ``agent.recovered``: the one that clears it. Any other event (a kill-list
        alert, ``subject`` naming the entry): the first replica to mark it."""
        spawn(self._claim(event, subject, then), f"reporting {event} for {subject}")

    async def _claim(self, event: str, subject: str, then: Callable[[], None]) -> None:
        try:
            if event == "agent.stale":
                key = f"{ops.P}stale:{subject}"
                mine = bool(await self.r.set(key, self.replica, nx=True, ex=7 * 86400))
            elif event == "agent.recovered":
                mine = bool(await self.r.delete(f"{ops.P}stale:{subject}"))
            else:
                key = f"{ops.P}once:{event}:{subject}"
                mine = bool(await self.r.set(key, self.replica, nx=True, ex=7 * 86400))
        except FAULTS:
            mine = True  # cannot agree: better one report per replica than none
        if mine:
            then()

    # ------------------------------------------------------------ the watcher

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        super().start(loop)
        self._watcher = loop.create_task(self._watch())

    async def _watch(self) -> None:
        """Subscribe, re-read the kill list (before anything else after a reconnect), then
        per message and per beat; on a fault mark down and reconnect."""
        sub: Any = None
        last_beat = 0.0
        while True:
            try:
                if sub is None:
                    sub = self.r.pubsub(ignore_subscribe_messages=True)
                    await sub.subscribe(ops.CHANNEL)
                    await self._reconnected()
                elif self.down:  # a decision call failed, the watcher's link did not
                    await self._reconnected()
                if time.monotonic() - last_beat >= BEAT or self._woken.is_set():
                    self._woken.clear()
                    last_beat = time.monotonic()
                    await self._beat()
                    await self._sync()
                message = await sub.get_message(timeout=0.2)
                if message is not None:
                    await self._sync()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a fault (or a bug): never let the watcher die
                if not isinstance(exc, FAULTS):
                    log.exception("axme-fw: Redis watcher failed; restarting it")
                self._mark_down(exc)
                if sub is not None:
                    with contextlib.suppress(Exception):
                        await sub.aclose()
                sub = None
                await asyncio.sleep(0.5)

    async def _reconnected(self) -> None:
        """The kill list first; only then do decisions use Redis again. Then what waited:
        auto-kills Redis could not take, and spend settled while it was down."""
        await self._sync()
        self._up()
        for kill in list(self._pending_redis.values()):
            if kill not in self.redis_kills:
                await self._share_kill(kill)
        while self._unsent and not self.down:
            agent, spec, actual, now, rid = self._unsent[0]
            await self._send_settle(agent, spec, actual, now, rid)
            self._unsent.popleft()

    async def _sync(self) -> None:
        """Read the kill list; put it back if Redis lost it; apply it if it moved on."""
        async with self.r.pipeline(transaction=True) as p:
            p.get(ops.REVISION)
            p.hgetall(ops.KILLS)
            rev, kills = _kills_of(await p.execute())
        if rev < self.revision:
            args: list[Any] = [self.revision]
            for k in self.redis_kills:
                args += [k.agent, ops.kill_json(k)]
            if await self._restore(keys=[ops.KILLS, ops.REVISION], args=args):
                self._say("store.restored", revision=self.revision + 1, kills=len(self.redis_kills))
            return await self._sync()
        if rev != self.revision:
            self.revision, self.redis_kills = rev, kills
            self.on_kills()

    async def _beat(self) -> None:
        """Heartbeat and published view, lease renewal, the spend this replica shows."""
        beat = {"listen": self.listen, "pid": os.getpid(), "at": time.time()}
        async with self.r.pipeline(transaction=False) as p:
            p.set(ops.P + "replica:" + self.replica, json.dumps(beat), ex=ops.HEARTBEAT_TTL)
            p.hset(ops.REGISTRY, self.replica, json.dumps(beat))
            p.set(ops.P + "health:" + self.replica, self._published, ex=30)
            await p.execute()
        if self._holds:
            holds = list(self._holds.values())
            keys = [ops.window_keys(h.agent, h.spec.key)[2] for h in holds]
            args: list[Any] = [time.time() + ops.HOLD_LEASE]
            for h in holds:
                args += [h.id, h.amount]
            await self._renew(keys=keys, args=args)
        if self._used:
            asked = list(self._used)
            got = await self.read_used(asked, time.time())
            before = dict(self._used)
            self._used.update(zip(asked, got, strict=True))
            if self._used != before:
                self.on_change()
        await self._read_fleet()

    async def _read_fleet(self) -> None:
        keys = [k async for k in self.r.scan_iter(ops.P + "health:*", count=500)]
        raws = await self.r.mget(keys) if keys else []
        snaps = [json.loads(raw).get("health") or {} for raw in raws if raw]
        self._fleet = merge_health(snaps)

    # ------------------------------------------------------------ faults

    def _mark_down(self, exc: BaseException) -> None:
        if not self.down:
            self.down = True
            log.error("axme-fw: Redis %s unreachable: %s", ops.redact(self.url), exc)
            self._say("store.down", error=(str(exc) or type(exc).__name__)[:200])

    def _up(self) -> None:
        if self.down:
            self.down = False
            log.info("axme-fw: Redis %s reachable again", ops.redact(self.url))
            self._say("store.up")

    def _say(self, event: str, **fields: Any) -> None:
        self.on_store_event(event, fields)

    @staticmethod
    async def _quiet(call: Any) -> None:
        with contextlib.suppress(*FAULTS):  # the watcher reports outages
            await call

    def close(self) -> None:
        """Shutdown (blocking): leave the fleet at once (no 5 s wait for the heartbeat to
        expire), then LocalStore's clean copy."""
        if self._watcher is not None:
            self._watcher.cancel()
        try:
            with ops.connect(self.url, TIMEOUT) as r:
                r.hdel(ops.ACKS, self.replica)
                r.hdel(ops.REGISTRY, self.replica)  # a clean stop: not lost, gone
                r.delete(ops.P + "replica:" + self.replica)
                settle = r.register_script(ops.SETTLE)
                while self._unsent:  # spend Redis has not seen yet: last chance
                    agent, spec, actual, now, rid = self._unsent[0]
                    ev, st, hk = ops.window_keys(agent, spec.key)
                    warned = f"{ops.P}warned:{agent}:{spec.key}"
                    settle(keys=[ev, st, hk, warned], args=[now, rid, actual, spec.per, -1])
                    self._unsent.popleft()
        except redis.RedisError:
            if self._unsent:
                log.error("axme-fw: %d settlements never reached Redis", len(self._unsent))
        super().close()


def for_proxy(fw: Firewall, url: str, state_dir: Path, rules_dir: Path) -> RedisStore:
    """The addon's store when ``--redis`` is given, wired to re-install the rules when the
    shared kill list changes, and to audit and alert store outages."""
    from mitmproxy import ctx

    replica = ctx.options.axme_replica_id or ops.default_replica_id(ctx.options.listen_port)
    store = RedisStore(
        url,
        replica,
        state_dir,
        rules_dir,
        fw._audit,
        lambda: fw.rules.defaults.store_on_unavailable,
    )

    def synced() -> None:
        fw._install(fw.file_rules)
        fw._audit("kills.synced", revision=store.revision, kills=len(store.redis_kills))
        fw.publisher.enforced()  # the acknowledgement every replica gives

    store.on_kills = synced

    def said(event: str, fields: dict[str, Any]) -> None:
        fw._audit(event, replica=replica, **fields)
        why = fields.get("error") or (
            "kill list put back" if "kills" in fields else "reachable again"
        )
        fw._alert(event, replica=replica, reason=why)

    store.on_store_event = said
    log.info("axme-fw: replica %s shares state through Redis %s", replica, ops.redact(url))
    return store
