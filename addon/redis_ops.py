"""State: what replicas share in Redis, the scripts that change it atomically, and the
blocking helpers the CLI and the admin API use (never the proxy's loop).

Every key is under ``axfw:``:

- ``w:AGENT:KEY`` a sorted set of recorded events (score: time, member ``id:amount``),
  ``s:AGENT:KEY`` a hash with a running sum and a cursor per window length
  (``p:PER``, ``c:PER``): each event is added once and subtracted once per window, so a
  check costs O(1) amortised however many events the window holds (the scheme of
  :class:`~axme_fw.limits_series.Series`), and ``h:AGENT:KEY`` open holds
  (``id → amount|expiry``: a lease the holding replica renews while its call runs).
- ``kills`` (hash agent → kill), ``kills:rev`` (revision), channel ``kills`` (the new
  revision, published), ``acks`` (replica → revision it enforces).
- ``replica:ID`` (heartbeat, short TTL), ``replicas`` (every replica's last beat: one
  whose heartbeat lapsed is *lost*, named by kills for ``LOST_WINDOW``), ``health:ID``
  (that replica's health and limits as it last published them), ``stale:AGENT`` (the
  replica that reported it stale), ``warned:AGENT:KEY`` (``warn_at`` passed in this window).

Numbers go in as Python ``repr`` (exact) and are stored by the scripts with 17 digits.
Times are the replicas' clocks (keep them in sync, NTP): a skew shifts windows by as much.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any

import redis

from .ruleset import Kill

P = "axfw:"
KILLS, REVISION, CHANNEL, ACKS = P + "kills", P + "kills:rev", P + "kills", P + "acks"
REGISTRY = P + "replicas"  # replica → its last beat: who should be live
HEARTBEAT_TTL = 5  # s: a replica whose heartbeat key expired is not live
LOST_WINDOW = 120.0  # s: a replica without heartbeat is named (lost) this long, then forgotten
HOLD_LEASE = 15.0  # s: a hold not renewed for this long (its replica died) is dropped


def window_keys(agent: str, key: str) -> tuple[str, str, str]:
    """(events, sums, holds) of ``agent``'s ``key``."""
    return f"{P}w:{agent}:{key}", f"{P}s:{agent}:{key}", f"{P}h:{agent}:{key}"


_LIB = """
local function num(x) return string.format('%.17g', x) end
local function amount_of(m) return tonumber(string.match(m, ':([^:]+)$')) end
-- Used in (now - per, now], advancing the running sum of this window length.
local function used(ev, st, now, per)
  local pk, ck, edge = 'p:' .. per, 'c:' .. per, now - per
  local cur, sum = redis.call('HGET', st, ck), 0
  if not cur then
    for _, m in ipairs(redis.call('ZRANGEBYSCORE', ev, '(' .. num(edge), '+inf')) do
      sum = sum + amount_of(m)
    end
  else
    cur, sum = tonumber(cur), tonumber(redis.call('HGET', st, pk) or '0')
    if edge > cur then
      for _, m in ipairs(redis.call('ZRANGEBYSCORE', ev, '(' .. num(cur), num(edge))) do
        sum = sum - amount_of(m)
      end
    else
      edge = cur  -- a clock behind the last one: never count an event twice
    end
    if sum ~= 0 and redis.call('ZCOUNT', ev, '(' .. num(edge), '+inf') == 0 then sum = 0 end
  end
  redis.call('HSET', st, pk, num(sum), ck, num(edge))
  return sum
end
-- Record an event once (a retried id is a no-op), counted in every running sum. Every
-- window is advanced first, so events older than the longest one can go.
local function record(ev, st, now, id, amount, per)
  local member = id .. ':' .. amount
  if redis.call('ZSCORE', ev, member) then return end
  local longest, h = per, redis.call('HGETALL', st)
  for i = 1, #h, 2 do
    local p = tonumber(string.match(h[i], '^c:(.+)$'))
    if p then
      redis.call('HSET', st, 'p:' .. p, num(used(ev, st, now, p) + tonumber(amount)))
      longest = math.max(longest, p)
    end
  end
  redis.call('ZADD', ev, now, member)
  redis.call('ZREMRANGEBYSCORE', ev, '-inf', num(now - longest))
  local keep = math.ceil(longest) + 60
  redis.call('EXPIRE', ev, keep)
  redis.call('EXPIRE', st, keep)
end
-- Open holds (expired ones dropped).
local function held(hk, now)
  local total, h = 0, redis.call('HGETALL', hk)
  for i = 1, #h, 2 do
    local a, exp = string.match(h[i + 1], '([^|]+)|(.+)')
    if tonumber(exp) <= now then redis.call('HDEL', hk, h[i]) else total = total + tonumber(a) end
  end
  return total
end
-- Seconds until enough of the window's oldest events expire that ok(freed) holds.
local function retry(ev, now, per, ok)
  local edge, freed, start = '(' .. num(now - per), 0, 0
  while true do
    local o = redis.call('ZRANGEBYSCORE', ev, edge, '+inf', 'WITHSCORES', 'LIMIT', start, 256)
    if #o == 0 then return per end
    for i = 1, #o, 2 do
      freed = freed + amount_of(o[i])
      if ok(freed) then return tonumber(o[i + 1]) + per - now end
    end
    start = start + #o / 2
  end
end
local function fits(total, max) return total <= max + math.max(1, math.abs(max)) * 1e-9 end
local function below(total, max) return total < max - math.max(1, math.abs(max)) * 1e-9 end
"""

# KEYS: ev, st, hk per spec.  ARGV: now, amount, id, then per spec: max, per, record (1/0:
# 0 when an earlier spec records on the same key).  -> {0} or {i, used, retry_after}
ADMIT = (
    _LIB
    + """
local now, amount, id = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local n = #KEYS / 3
for i = 1, n do
  local ev, st, hk = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local max, per = tonumber(ARGV[1 + 3 * i]), tonumber(ARGV[2 + 3 * i])
  local u, a = used(ev, st, now, per) + held(hk, now), tonumber(amount)
  if not fits(u + a, max) then
    local wait = retry(ev, now, per, function(f) return fits(u - f + a, max) end)
    return {i, num(u), num(wait)}
  end
end
if tonumber(amount) > 0 then
  for i = 1, n do
    if ARGV[3 + 3 * i] == '1' then
      record(KEYS[3 * i - 2], KEYS[3 * i - 1], now, id, amount, tonumber(ARGV[2 + 3 * i]))
    end
  end
end
return {0}
"""
)

# KEYS: ev, st, hk.  ARGV: now, amount, max, per, id, lease.  -> {1} or {0, used, retry}
RESERVE = (
    _LIB
    + """
local now, amount = tonumber(ARGV[1]), tonumber(ARGV[2])
local max, per = tonumber(ARGV[3]), tonumber(ARGV[4])
local u, h = used(KEYS[1], KEYS[2], now, per), held(KEYS[3], now)
local alone = redis.call('HLEN', KEYS[3]) == 0
local function ok(f) return fits(u - f + h + amount, max) or (alone and below(u - f, max)) end
if not ok(0) then return {0, num(u + h), num(retry(KEYS[1], now, per, ok))} end
redis.call('HSET', KEYS[3], ARGV[5], ARGV[2] .. '|' .. num(now + tonumber(ARGV[6])))
redis.call('EXPIRE', KEYS[3], math.ceil(tonumber(ARGV[6]) + per))
return {1}
"""
)

# KEYS: ev, st, hk, warned.  ARGV: now, id, actual, per, warn level (-1: none).
# The hold goes (if still there) and ``actual`` is recorded under the hold's id, once:
# a retried settle never charges twice, a settle after the lease ran out still charges.
# -> {used, warned now (1/0)}
SETTLE = (
    _LIB
    + """
local now, per, level = tonumber(ARGV[1]), tonumber(ARGV[4]), tonumber(ARGV[5])
redis.call('HDEL', KEYS[3], ARGV[2])
if tonumber(ARGV[3]) > 0 then record(KEYS[1], KEYS[2], now, ARGV[2], ARGV[3], per) end
local u, warned = used(KEYS[1], KEYS[2], now, per), 0
if level >= 0 then
  if below(u, level) then redis.call('DEL', KEYS[4])
  elseif redis.call('SET', KEYS[4], '1', 'NX', 'EX', math.ceil(per) + 1) then warned = 1 end
end
return {num(u), warned}
"""
)

# KEYS: ev, st per window.  ARGV: now, then per window: per.  -> {used, ...}
USED = (
    _LIB
    + """
local out = {}
for i = 1, #KEYS / 2 do
  out[i] = num(used(KEYS[2 * i - 1], KEYS[2 * i], tonumber(ARGV[1]), tonumber(ARGV[1 + i])))
end
return out
"""
)

# KEYS: hk per hold.  ARGV: expiry, then per hold: id, amount.  Renews the leases of holds
# still open (a settled one is not brought back).
RENEW = """
for i = 1, #KEYS do
  local id = ARGV[2 * i]
  if redis.call('HEXISTS', KEYS[i], id) == 1 then
    redis.call('HSET', KEYS[i], id, ARGV[2 * i + 1] .. '|' .. ARGV[1])
  end
end
return #KEYS
"""

# KEYS: kills, revision.  ARGV: the revision this replica enforces, then agent, kill, ...
# Redis lost the list (restarted without persistence): put back what a replica enforces.
# -> 1 if this call put it back, 0 if another replica did first.
RESTORE = """
local cur = tonumber(redis.call('GET', KEYS[2]) or '0')
if cur >= tonumber(ARGV[1]) then return 0 end
for i = 2, #ARGV, 2 do redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) end
local rev = tonumber(ARGV[1]) + 1
redis.call('SET', KEYS[2], rev)
redis.call('PUBLISH', KEYS[1], rev)
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


def url_error(url: str) -> str | None:
    """Why ``url`` is not a Redis URL this can use (password redacted), or None."""
    try:
        redis.connection.parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        return f"--redis {redact(url)}: {exc} (use redis://[:PASSWORD@]HOST:PORT/DB or rediss://)"
    return None


def default_replica_id(port: int) -> str:
    return f"{socket.gethostname()}:{port}"


def connect(url: str, timeout: float) -> redis.Redis:
    """A blocking client (the CLI, the admin API's worker threads, start-up)."""
    return redis.Redis.from_url(
        url, socket_timeout=timeout, socket_connect_timeout=timeout, decode_responses=True
    )


def kill_json(kill: Kill) -> str:
    fields = {"agent": kill.agent, "mode": kill.mode, "reason": kill.reason, "by": kill.by}
    return json.dumps({**fields, "at": kill.at})


def parse_kills(entries: dict[str, str]) -> tuple[Kill, ...]:
    kills = []
    for raw in sorted(entries.values()):
        d = json.loads(raw)
        kills.append(Kill(d["agent"], d["mode"], d.get("reason", ""), d.get("by", ""), d["at"]))
    return tuple(kills)


def read_kills(r: redis.Redis) -> tuple[int, tuple[Kill, ...]]:
    """The kill list and its revision, read together."""
    with r.pipeline(transaction=True) as p:
        p.get(REVISION)
        p.hgetall(KILLS)
        rev, entries = p.execute()
    return int(rev or 0), parse_kills(entries)


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
    """Replicas with the revision each acknowledged: see :func:`classify`. Blocking."""
    with r.pipeline(transaction=False) as p:
        p.hgetall(ACKS)
        p.hgetall(REGISTRY)
        acks, registry = p.execute()
    beats = r.mget([P + "replica:" + rid for rid in registry]) if registry else []
    known, gone = classify(acks, registry, beats, time.time())
    if gone:
        r.hdel(REGISTRY, *gone)
    return known


def classify(
    acks: dict[str, str], registry: dict[str, str], beats: Sequence[Any], now: float
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """(replicas, ids to forget) from the ``acks`` and ``replicas`` hashes and each
    registered replica's heartbeat key (``beats``, in registry order). Live: heartbeat key
    present. Lost (``lost_s``): registered, no heartbeat for that long, under
    ``LOST_WINDOW``: crashed, or cut off from Redis and perhaps still serving on the kill
    list it last read. A replica that stops cleanly leaves the registry."""
    out: dict[str, dict[str, Any]] = {}
    gone = []
    for (rid, last), beat in zip(registry.items(), beats, strict=True):
        acked = int(acks.get(rid, -1))
        if beat is not None:
            out[rid] = {**json.loads(beat), "acked": acked}
            continue
        info = json.loads(last)
        lost = now - float(info.get("at") or 0)
        if lost > LOST_WINDOW:
            gone.append(rid)
        else:
            out[rid] = {**info, "acked": acked, "lost_s": round(lost, 1)}
    return out, gone


def waited(known: dict[str, dict[str, Any]], revision: int) -> list[str]:
    """The replicas that have not acknowledged ``revision`` yet, as :func:`named`."""
    return [named(rid, rep) for rid, rep in sorted(known.items()) if rep["acked"] < revision]


def named(rid: str, rep: dict[str, Any]) -> str:
    """A replica as the CLI names one that did not acknowledge."""
    if "lost_s" in rep:
        return f"{rid} (no heartbeat for {rep['lost_s']:g} s: down, or cut off from Redis)"
    return rid


def change_and_wait(
    r: redis.Redis, agent: str, kill: Kill | None, wait: float
) -> tuple[int, list[str], list[str], float]:
    """Write a kill (or a resume: None) and wait up to ``wait`` s until every replica
    acknowledges it: (revision, replicas, those behind as :func:`named`, ms). A lost
    replica is waited for (it may be reconnecting) and named if it does not come back.
    Blocking."""
    started = time.monotonic()
    revision = write_kill(r, agent, kill)
    while True:
        known = replicas(r)
        behind = waited(known, revision)
        if not behind or time.monotonic() - started >= wait:
            return revision, sorted(known), behind, (time.monotonic() - started) * 1000
        time.sleep(0.002)


def published(r: redis.Redis) -> list[dict[str, Any]]:
    """What every replica last published (``health``, ``limits``, ``at``)."""
    keys = list(r.scan_iter(P + "health:*", count=500))
    return [json.loads(raw) for raw in (r.mget(keys) if keys else []) if raw]
