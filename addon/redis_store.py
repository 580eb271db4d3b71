"""State: :class:`RedisStore`, the :class:`~axme_fw.store.Store` that N replicas share.

What is shared, and how (one ``redis-server``, every key under ``axfw:``):

- **Limit windows and spend**: each (agent, key) is a sorted set of events (score: time,
  member: ``id:amount``) plus a hash of open reservations (``amount|expiry``). Check and
  record (:meth:`admit`), check and hold (:meth:`reserve`), and replace a hold by the
  real cost (:meth:`settle`) are each one Lua script, so they are atomic across
  replicas. Settling twice is a no-op (the hold is deleted by the first); holds expire
  (``RESERVATION_TTL``), so a replica that dies mid-call does not hold budget forever.
- **The kill list**: a hash ``axfw:kills`` and a revision counter, changed in one
  MULTI/EXEC with a PUBLISH on ``axfw:kills``. A background thread listens, re-reads
  every second as a backstop for missed messages, and hands the list to the loop.
  It combines with ``rules/kill.yaml``: a kill in either holds; a resume only removes
  what it names where it was written.
- **Replicas**: each has an id and a heartbeat key with a short TTL
  (``axfw:replica:ID``), and acknowledges the kill-list revision it enforces in the hash
  ``axfw:acks``; ``axme-fw --redis URL kill`` waits for every live replica.

Faults: when Redis cannot be reached, kills already known stay in force (never forget a
kill); a replica that never loaded the kill list is not ready and refuses everything;
requests that need a shared limit or ceiling are refused 503 ``store_unavailable``
(``defaults.store.on_unavailable: refuse``, the default) or counted in this replica's
memory (``local``, documented as weaker). ``store.down`` / ``store.up`` are audited
once each. Health, status snapshots and the audit chain stay per replica.

Calls that decide (admit, reserve, settle) are one round trip on the loop, bounded by a
short socket timeout; they are made only for agents that have limits or ceilings.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import itertools
import json
import logging
import math
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from .health import Health
from .health import merge as merge_health
from .limits import Exceeded, LimitSpec, Reservation
from .ruleset import Kill, Ruleset
from .store import Audit, LocalStore, StoreUnavailable

if TYPE_CHECKING:
    from .firewall import Firewall

log = logging.getLogger(__name__)

P = "axfw:"
KILLS, REVISION, CHANNEL, ACKS = P + "kills", P + "kills:rev", P + "kills", P + "acks"
RESERVATION_TTL = 600.0  # an LLM call longer than this is charged its estimate
HEARTBEAT_TTL = 5
TIMEOUT = 0.25  # seconds: a decision never waits longer on Redis

_LIB = """
local function used(ev, now, per)
  local total = 0
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', ev, '(' .. (now - per), '+inf')) do
    total = total + tonumber(string.match(m, ':([^:]+)$'))
  end
  return total
end
local function held(hk, now)
  local total, h = 0, redis.call('HGETALL', hk)
  for i = 1, #h, 2 do
    local a, exp = string.match(h[i + 1], '([^|]+)|(.+)')
    if tonumber(exp) <= now then redis.call('HDEL', hk, h[i]) else total = total + tonumber(a) end
  end
  return total
end
local function retry(ev, now, per)
  local o = redis.call('ZRANGEBYSCORE', ev, '(' .. (now - per), '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  if #o > 0 then return tonumber(o[2]) + per - now end
  return per
end
local function fits(total, max) return total <= max + math.abs(max) * 1e-9 + 1e-12 end
"""

# KEYS: ev1, hk1, ev2, hk2, ...  ARGV: now, amount, id, then per spec: max, per, keep
# (keep: "" when another spec records on the same key, else how long events are kept).
ADMIT = (
    _LIB
    + """
local now, amount, id = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local n = #KEYS / 2
for i = 1, n do
  local ev, hk = KEYS[2 * i - 1], KEYS[2 * i]
  local max, per = tonumber(ARGV[1 + 3 * i]), tonumber(ARGV[2 + 3 * i])
  local u = used(ev, now, per) + held(hk, now)
  if not fits(u + amount, max) then return {i, tostring(u), tostring(retry(ev, now, per))} end
end
if amount > 0 then
  for i = 1, n do
    local keep = ARGV[3 + 3 * i]
    if keep ~= '' then
      local ev = KEYS[2 * i - 1]
      redis.call('ZADD', ev, now, id .. ':' .. amount)
      redis.call('ZREMRANGEBYSCORE', ev, '-inf', now - tonumber(keep))
      redis.call('EXPIRE', ev, math.ceil(tonumber(keep)) + 60)
    end
  end
end
return {0}
"""
)

# KEYS: ev, hk  ARGV: now, amount, max, per, id, ttl
RESERVE = (
    _LIB
    + """
local now, amount = tonumber(ARGV[1]), tonumber(ARGV[2])
local max, per = tonumber(ARGV[3]), tonumber(ARGV[4])
local u, h = used(KEYS[1], now, per), held(KEYS[2], now)
local alone = redis.call('HLEN', KEYS[2]) == 0
if not (fits(u + h + amount, max) or (alone and u < max - math.abs(max) * 1e-9)) then
  return {0, tostring(u + h), tostring(retry(KEYS[1], now, per))}
end
redis.call('HSET', KEYS[2], ARGV[5], ARGV[2] .. '|' .. (now + tonumber(ARGV[6])))
redis.call('EXPIRE', KEYS[2], math.ceil(tonumber(ARGV[6]) + per))
return {1}
"""
)

# KEYS: ev, hk  ARGV: now, id, actual (-1: release), keep
SETTLE = """
if redis.call('HDEL', KEYS[2], ARGV[2]) == 0 then return 0 end
local actual = tonumber(ARGV[3])
if actual > 0 then
  redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2] .. ':' .. ARGV[3])
  redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[4])) + 60)
end
return 1
"""


def redact(url: str) -> str:
    """``redis://:****@host:6379/0``: the password never reaches a log."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:****@{netloc}"))


def default_replica_id(port: int) -> str:
    return f"{socket.gethostname()}:{port}"


def connect(url: str, timeout: float = TIMEOUT) -> redis.Redis:
    return redis.Redis.from_url(
        url, socket_timeout=timeout, socket_connect_timeout=timeout, decode_responses=True
    )


def kill_json(kill: Kill) -> str:
    return json.dumps(
        {
            "agent": kill.agent,
            "mode": kill.mode,
            "reason": kill.reason,
            "by": kill.by,
            "at": kill.at,
        }
    )


def read_kills(r: redis.Redis) -> tuple[int, tuple[Kill, ...]]:
    """The kill list and its revision, read together."""
    with r.pipeline(transaction=True) as p:
        p.get(REVISION)
        p.hgetall(KILLS)
        rev, entries = p.execute()
    kills = []
    for raw in sorted(entries.values()):
        d = json.loads(raw)
        kills.append(Kill(d["agent"], d["mode"], d.get("reason", ""), d.get("by", ""), d["at"]))
    return int(rev or 0), tuple(kills)


def write_kill(r: redis.Redis, agent: str, kill: Kill | None) -> int:
    """Add (or replace) ``agent``'s kill, or remove it (``kill`` None): one atomic write
    with a new revision, published to every replica. Returns the revision."""
    with r.pipeline(transaction=True) as p:
        if kill is None:
            p.hdel(KILLS, agent)
        else:
            p.hset(KILLS, agent, kill_json(kill))
        p.incr(REVISION)
        rev = p.execute()[-1]
    r.publish(CHANNEL, str(rev))
    return int(rev)


def replicas(r: redis.Redis) -> dict[str, dict[str, Any]]:
    """Live replicas (heartbeat key present) with the revision each acknowledged."""
    acks = r.hgetall(ACKS)
    out = {}
    for key in r.scan_iter(P + "replica:*", count=500):
        raw = r.get(key)
        if raw is None:
            continue
        rid = key.removeprefix(P + "replica:")
        out[rid] = {**json.loads(raw), "acked": int(acks.get(rid, -1))}
    return out


# KEYS: kills, revision  ARGV: the revision this replica enforces, then agent, kill json, ...
RESTORE = """
local cur = tonumber(redis.call('GET', KEYS[2]) or '0')
if cur >= tonumber(ARGV[1]) then return cur end
for i = 2, #ARGV, 2 do redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) end
local rev = tonumber(ARGV[1]) + 1
redis.call('SET', KEYS[2], rev)
redis.call('PUBLISH', KEYS[1], rev)
return rev
"""


def change_and_wait(
    r: redis.Redis, agent: str, kill: Kill | None, wait: float
) -> tuple[int, list[str], list[str], float]:
    """Write a kill (or a resume: None) and wait up to ``wait`` s until every live replica
    acknowledges it: (revision, live replicas, those behind, ms). Blocking."""
    started = time.monotonic()
    revision = write_kill(r, agent, kill)
    while True:
        live = replicas(r)
        behind = sorted(rid for rid, rep in live.items() if rep["acked"] < revision)
        if not behind or time.monotonic() - started >= wait:
            return revision, sorted(live), behind, (time.monotonic() - started) * 1000
        time.sleep(0.002)


class RedisStore(LocalStore):
    """Limits, spend and the kill list in Redis; health and snapshots as LocalStore."""

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
        self.r = connect(url)
        self._admit = self.r.register_script(ADMIT)
        self._reserve = self.r.register_script(RESERVE)
        self._settle = self.r.register_script(SETTLE)
        self._restore = self.r.register_script(RESTORE)
        self._ids = itertools.count(int.from_bytes(os.urandom(6), "big") << 16)
        self.revision = -1  # the Redis kill-list revision applied; -1: never loaded
        self.redis_kills: tuple[Kill, ...] = ()
        self.down = False
        self.on_kills: Callable[[], None] = lambda: None  # the loop re-installs the rules
        self._pending_redis: dict[str, Kill] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._io = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="axme-fw-redis")
        self.listen: list[str] = []
        self._known_agents: set[str] = set()
        self._fleet = Health()  # every replica's health, merged (the watcher refreshes it)
        self.on_store_event: Callable[[str, dict[str, Any]], None] = lambda e, f: audit(
            e, replica=replica, **f
        )
        try:
            self.revision, self.redis_kills = read_kills(self.r)  # before traffic
        except redis.RedisError as exc:
            # A warning: an ERROR at start-up makes mitmproxy exit, and a replica must
            # wait for Redis (not ready, serving nothing) rather than crash-loop.
            log.warning("axme-fw: Redis %s unreachable at start: %s", redact(url), exc)
            self.down = True

    def ready(self) -> bool:
        return self.revision >= 0

    # ------------------------------------------------------------ limits and spend

    def _unavailable(self, exc: Exception) -> bool:
        """True: count locally; else raise StoreUnavailable (refuse)."""
        self._mark_down(exc)
        if self._on_unavailable() == "local":
            return True
        raise StoreUnavailable(str(exc)) from None

    def _keys(self, agent: str, key: str) -> tuple[str, str]:
        return f"{P}w:{agent}:{key}", f"{P}h:{agent}:{key}"

    def admit(
        self, agent: str, specs: Sequence[LimitSpec], now: float, amount: float = 1.0
    ) -> Exceeded | None:
        keep: dict[str, float] = {}
        for s in specs:
            keep[s.key] = max(keep.get(s.key, 0.0), s.per)
        keys: list[str] = []
        args: list[Any] = [now, amount, f"{next(self._ids)}"]
        recorded: set[str] = set()
        for s in specs:
            keys += self._keys(agent, s.key)
            first = s.key not in recorded
            recorded.add(s.key)
            args += [s.max, s.per, keep[s.key] if first else ""]
        try:
            got = self._admit(keys=keys, args=args)
        except redis.RedisError as exc:
            if self._unavailable(exc):
                return super().admit(agent, specs, now, amount)
            raise  # pragma: no cover - _unavailable raised
        self._up()
        if int(got[0]) == 0:
            self.r_agents_add(agent)
            return None
        spec = specs[int(got[0]) - 1]
        return Exceeded(spec, float(got[1]), max(0.0, float(got[2])))

    def reserve(
        self, agent: str, spec: LimitSpec, amount: float, now: float
    ) -> Reservation | Exceeded:
        res = Reservation(next(self._ids), agent, spec, amount)
        ev, hk = self._keys(agent, spec.key)
        args = [now, amount, spec.max, spec.per, res.id, RESERVATION_TTL]
        try:
            got = self._reserve(keys=[ev, hk], args=args)
        except redis.RedisError as exc:
            if self._unavailable(exc):
                return super().reserve(agent, spec, amount, now)
            raise  # pragma: no cover
        self._up()
        if int(got[0]) == 0:
            return Exceeded(spec, float(got[1]), max(0.0, float(got[2])))
        self.r_agents_add(agent)
        return res

    def settle(self, reservation: Reservation, actual: float, now: float) -> None:
        ev, hk = self._keys(reservation.agent, reservation.spec.key)
        ok = math.isfinite(actual) and actual >= 0
        args = [now, reservation.id, actual if ok else reservation.amount]
        try:
            self._settle(keys=[ev, hk], args=[*args, reservation.spec.per])
        except redis.RedisError as exc:
            self._mark_down(exc)
            super().settle(reservation, actual, now)  # charged here: spend is never lost
        self._changed()

    def release(self, reservation: Reservation) -> None:
        ev, hk = self._keys(reservation.agent, reservation.spec.key)
        try:
            self._settle(keys=[ev, hk], args=[time.time(), reservation.id, 0, 0])
        except redis.RedisError as exc:
            self._mark_down(exc)
        super().release(reservation)

    def used(self, agent: str, key: str, per: float, now: float) -> float:
        try:
            events: list[str] = self.r.zrangebyscore(  # type: ignore[assignment]
                self._keys(agent, key)[0], f"({now - per}", "+inf"
            )
        except redis.RedisError:
            return super().used(agent, key, per, now)
        return float(sum(float(m.rsplit(":", 1)[1]) for m in events))

    def warn_crossed(self, agent: str, spec: LimitSpec, now: float) -> bool:
        if spec.warn_at is None:
            return False
        flag = f"{P}warned:{agent}:{spec.key}"
        try:
            if self.used(agent, spec.key, spec.per, now) < spec.warn_at * spec.max:
                self.r.delete(flag)
                return False
            return bool(self.r.set(flag, "1", nx=True, ex=int(spec.per) + 1))
        except redis.RedisError:
            return False

    def r_agents_add(self, agent: str) -> None:
        if agent not in self._known_agents:
            self._known_agents.add(agent)
            self._io.submit(self._quiet, self.r.sadd, P + "agents", agent)

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
        """An auto-kill: held here at once, written to Redis for every replica (retried
        until written), and to kill.yaml when Redis cannot be reached."""
        self._pending_redis[kill.agent] = kill

        local = super().kill

        def write() -> None:
            try:
                write_kill(self.r, kill.agent, kill)
            except redis.RedisError as exc:
                log.error("axme-fw: auto-kill of %s not in Redis (%s): kill.yaml", kill.agent, exc)
                if self.loop is not None:
                    self.loop.call_soon_threadsafe(local, kill)

        self._io.submit(write)

    # ------------------------------------------------------------ health, fleet-wide

    def publish_live(self, live: Any) -> None:
        """Also share this replica's health, so staleness and status see the fleet."""
        super().publish_live(live)
        health = json.dumps(live.get("health") or {})
        key = P + "health:" + self.replica
        self._io.submit(self._quiet, functools.partial(self.r.set, key, health, ex=30))

    def sweep(self, now: float, stale_after: Callable[[str], float]) -> list[str]:
        """Agents stale for the whole fleet, each reported by one replica only (the one
        that sets ``axfw:stale:AGENT`` first)."""
        out = []
        for agent in super().sweep(now, stale_after):
            seen = self._fleet.agents.get(agent)
            if seen is not None and now - seen.last < stale_after(agent):
                continue  # another replica sees it: not stale for the fleet
            try:
                if self.r.set(f"{P}stale:{agent}", self.replica, nx=True, ex=7 * 86400):
                    out.append(agent)
            except redis.RedisError:
                out.append(agent)  # cannot agree: better one alert per replica than none
        return out

    def saw(self, agent: str, instance: str, now: float) -> bool:
        """True (alert ``agent.recovered``) on one replica only: the one that clears the
        fleet's stale mark."""
        if not super().saw(agent, instance, now):
            return False
        try:
            return bool(self.r.delete(f"{P}stale:{agent}"))
        except redis.RedisError:
            return True

    def _read_fleet(self) -> None:
        """In the watcher thread: every replica's published health, merged."""
        snaps = []
        for key in self.r.scan_iter(P + "health:*", count=500):
            raw = self.r.get(key)
            if raw:
                snaps.append(json.loads(raw))
        self._fleet = merge_health(snaps)

    def ack(self, enforced: Any) -> None:
        super().ack({**dict(enforced), "redis_revision": self.revision, "replica": self.replica})
        self.listen = list(enforced.get("listen") or [])
        if self.revision >= 0:
            self._io.submit(self._quiet, self.r.hset, ACKS, self.replica, self.revision)

    @staticmethod
    def _quiet(call: Callable[..., Any], *args: Any) -> None:
        with contextlib.suppress(redis.RedisError):  # the watcher reports outages
            call(*args)

    # ------------------------------------------------------------ the watcher thread

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        super().start(loop)
        self._thread = threading.Thread(target=self._watch, name="axme-fw-redis-watch", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        sub = None
        last_beat = 0.0
        while not self._stop.is_set():
            try:
                if sub is None:
                    sub = connect(self.url, timeout=2.0).pubsub(ignore_subscribe_messages=True)
                    sub.subscribe(CHANNEL)
                    self._refresh()
                if time.monotonic() - last_beat >= 1.0:
                    last_beat = time.monotonic()
                    beat = {"listen": self.listen, "pid": os.getpid(), "at": time.time()}
                    self.r.set(P + "replica:" + self.replica, json.dumps(beat), ex=HEARTBEAT_TTL)
                    self._refresh()  # the backstop for a missed message
                    self._read_fleet()
                if sub.get_message(timeout=0.2) is not None:
                    self._refresh()
            except (redis.RedisError, OSError) as exc:
                self._mark_down(exc)
                if sub is not None:
                    with contextlib.suppress(Exception):
                        sub.close()
                sub = None
                self._stop.wait(0.5)

    def _refresh(self) -> None:
        rev, kills = read_kills(self.r)
        known, revision = self.redis_kills, self.revision
        if rev < revision:
            # Redis lost the list (restarted without persistence): put back what this
            # replica enforces. Never a resume by omission; a later resume still works.
            args: list[Any] = [revision]
            for k in known:
                args += [k.agent, kill_json(k)]
            self._restore(keys=[KILLS, REVISION], args=args)
            rev, kills = read_kills(self.r)
            self._say("store.restored", revision=rev, kills=len(known))
        self._up()
        if rev != self.revision and self.loop is not None:
            self.loop.call_soon_threadsafe(self._apply, rev, kills)

    def _apply(self, rev: int, kills: tuple[Kill, ...]) -> None:
        if rev < self.revision:
            return  # older than what is enforced: a later read brings the current list
        self.revision, self.redis_kills = rev, kills
        self.on_kills()

    def _mark_down(self, exc: Exception) -> None:
        if not self.down:
            self.down = True
            log.error("axme-fw: Redis %s unreachable: %s", redact(self.url), exc)
            self._say("store.down", error=str(exc)[:200])

    def _up(self) -> None:
        if self.down:
            self.down = False
            log.info("axme-fw: Redis %s reachable again", redact(self.url))
            self._say("store.up")

    def _say(self, event: str, **fields: Any) -> None:
        """Audit and alert, once per change, from any thread."""
        loop = self.loop
        if loop is not None:
            loop.call_soon_threadsafe(lambda: self.on_store_event(event, fields))
        else:
            self._audit(event, replica=self.replica, **fields)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
        self._io.shutdown(wait=True)
        try:
            self.r.hdel(ACKS, self.replica)
            self.r.delete(P + "replica:" + self.replica)
        except redis.RedisError:
            pass
        super().close()


def for_proxy(fw: Firewall, url: str, state_dir: Path, rules_dir: Path) -> RedisStore:
    """The addon's store when ``--redis`` is given, wired to re-install the rules when the
    shared kill list changes, and to audit and alert store outages."""
    from mitmproxy import ctx

    replica = ctx.options.axme_replica_id or default_replica_id(ctx.options.listen_port)
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
        fw._alert(event, agent="-", reason=fields.get("error", "reachable again"))

    store.on_store_event = said
    return store
