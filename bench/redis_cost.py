"""Section ``redis``: what sharing state through ``--redis`` costs one replica.

- Throughput: the same firewall (same rules) with and without ``--redis``, for an agent
  with a request limit that never refuses (``LIMITS``) and for an agent without limits,
  and bare mitmdump, all in the same rounds. A round runs the five in one order, the next
  round in the reverse order, so the two runs of each with/without pair are adjacent in
  time; a ratio is the median over rounds of the ratio within a round.
- Redis commands per request: every command Redis runs (``MONITOR``) during N sequential
  requests of one agent on one keep-alive connection, less what the replica sends on its
  own (heartbeat, kill-list backstop, fleet health) over an idle interval of the same
  length, measured right after. Commands a client sends (one round trip each, except
  inside MULTI/EXEC) are counted apart from those its Lua scripts run inside Redis
  (``INFO commandstats`` and ``total_commands_processed`` count both together).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from collections.abc import Awaitable
from typing import Any

from .common import FULL, HOST, wait_until
from .fixtures import BENCH, LIMITED, Cred, agent_file
from .redis_server import Monitor, RedisServer, start_redis
from .report import Row
from .rig import Proxy, Rig
from .wire import proxied_get, read_response

LIMITS = "{requests: {max: 100000000, per: 1h, on_exceed: throttle}}"
AGENTS = 10  # generated agents besides the bench's own; the rule count is not measured here
Key = tuple[str, str]  # (client | lua, command)
WARMUP = 20  # requests per agent before counting (one-time work: the agent set, caches)


async def run(rig: Rig) -> None:
    server = await start_redis(rig, "redis-cost")
    if server is None:
        rig.add(Row("redis", "skipped: redis-server not installed", "", None, None))
        return
    files = {"limited.yaml": agent_file(LIMITED, LIMITS)}
    names = ("redis-local", "redis-shared")
    try:
        local = await rig.firewall(names[0], AGENTS, files=files)
        shared = await rig.firewall(
            names[1], AGENTS, ["--redis", server.url, "--replica-id", "solo"], files=files
        )
        await wait_until(
            lambda: bool(server.client.exists("axfw:replica:solo")), 10, "the replica's heartbeat"
        )
        await commands_per_request(rig, server, shared)
        await throughput(rig, server, local, shared)
    finally:
        for name in names:
            await rig.stop_proxy(name)
        await rig.stop_proxy("bare")
        await rig.procs.stop(server.proc)


# ------------------------------------------------------------ commands per request


async def sequential(rig: Rig, proxy: Proxy, cred: Cred, n: int) -> None:
    """``n`` GETs of ``cred`` through ``proxy``, one at a time on one keep-alive connection."""
    req = proxied_get(rig.target, "/", cred.auth)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, proxy.port), 10)
    try:
        for i in range(n):
            writer.write(req)
            status, headers, _ = await asyncio.wait_for(read_response(reader), 10)
            if status != 200:
                raise RuntimeError(f"{cred.agent}: request {i} got {status} through {proxy.name}")
            if headers.get("connection", "").lower() == "close":
                writer.close()
                reader, writer = await asyncio.open_connection(HOST, proxy.port)
    finally:
        writer.close()


async def counted(server: RedisServer, work: Awaitable[Any]) -> tuple[Counter[Key], float]:
    """The commands Redis ran while ``work`` ran (source, name), and how long it ran (s)."""
    mon = Monitor(server)
    await mon.open()
    t0 = time.monotonic()
    try:
        await asyncio.wait_for(work, 120)
    finally:
        secs = time.monotonic() - t0
        counts = await mon.close()
    return counts, secs


async def commands_per_request(rig: Rig, server: RedisServer, shared: Proxy) -> None:
    """Round trips (commands sent) and commands run in scripts, per request, by agent."""
    n = 3000 if rig.sizes is FULL else 500
    found: dict[str, Any] = {}
    idle_rates: list[float] = []
    for cred, label in ((LIMITED, "limited agent"), (BENCH, "unlimited agent")):
        await sequential(rig, shared, cred, WARMUP)
        busy, secs = await counted(server, sequential(rig, shared, cred, n))
        idle, idle_secs = await counted(server, asyncio.sleep(secs))
        scale = secs / idle_secs
        per = {k: (busy[k] - idle[k] * scale) / n for k in sorted({*busy, *idle})}
        idle_rates.append(idle.total() / idle_secs)
        found[cred.agent] = {
            "requests": n,
            "seconds": secs,
            "idle_seconds": idle_secs,
            "busy": {" ".join(k): v for k, v in busy.items()},
            "idle": {" ".join(k): v for k, v in idle.items()},
        }
        for source, what in (
            ("client", "Redis commands sent (round trips) per request"),
            ("lua", "Redis commands run in scripts per request"),
        ):
            mine = {k[1]: v for k, v in per.items() if k[0] == source}
            parts = ", ".join(f"{c} {v:.2f}" for c, v in mine.items() if abs(v) >= 0.005)
            rig.add(
                Row(
                    "redis",
                    f"{label}: {what}",
                    "cmd",
                    None,
                    sum(mine.values()),
                    note=f"{n} sequential requests on one keep-alive connection in {secs:.1f} s, "
                    f"counted by MONITOR, less the replica's own commands over an idle "
                    f"{idle_secs:.1f} s ({idle.total()}); by command: {parts or 'none'}",
                )
            )
    rig.details["redis_commands"] = found
    rig.add(
        Row(
            "redis",
            "idle replica: its own Redis commands per second",
            "cmd/s",
            None,
            statistics.mean(idle_rates),
            note="heartbeat, kill-list re-read and fleet health, about once a second",
        )
    )


# ------------------------------------------------------------ throughput


def window_events(server: RedisServer) -> int:
    """Events in the limited agent's windows in Redis (each limited request adds one)."""
    keys = list(server.client.scan_iter(f"axfw:w:{LIMITED.agent}:*"))
    return sum(int(server.client.zcard(k)) for k in keys)


async def throughput(rig: Rig, server: RedisServer, local: Proxy, shared: Proxy) -> None:
    s = rig.sizes
    bare = await rig.bare()
    spec: list[tuple[str, Proxy, Cred]] = [
        ("bare", bare, BENCH),
        ("local-limited", local, LIMITED),
        ("redis-limited", shared, LIMITED),
        ("local-unlimited", local, BENCH),
        ("redis-unlimited", shared, BENCH),
    ]
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in spec}
    for k in range(s.rounds):
        if rig.deadline.passed() and runs["bare"]:
            break
        for name, proxy, cred in spec if k % 2 == 0 else spec[::-1]:
            runs[name].append(await rig.load(proxy, "http", s.seconds, cred))
            if name == "redis-limited":  # the limit's window in Redis: events it holds
                runs[name][-1]["window_events"] = await asyncio.to_thread(window_events, server)

    def paired(a: str, b: str, key: str = "rps") -> float:
        return statistics.median(rb[key] / ra[key] for ra, rb in zip(runs[a], runs[b], strict=True))

    def med(name: str, key: str = "rps") -> float:
        return statistics.median(r[key] for r in runs[name])

    rig.details["redis_throughput"] = {"runs": runs, "limits": LIMITS}
    n = len(runs["bare"])
    how = (
        f"{n} rounds of {s.seconds:g} s runs, {s.conns} connections ({rig.load_tool}); "
        "a, b: medians; b/a: median over rounds of the ratio within a round"
    )
    for agent, goal in (("limited", 0.9), ("unlimited", 0.97)):
        lo, re = f"local-{agent}", f"redis-{agent}"
        what = "agent without limits"
        if agent == "limited":
            held = [int(r["window_events"]) for r in runs[re]]
            what = (
                f"agent with limits {LIMITS}; its window in Redis held {held[0]:,} to "
                f"{held[-1]:,} events after the --redis runs (req/s per run: "
                f"{', '.join(f'{r["rps"]:.0f}' for r in runs[re])})"
            )
        r = paired(lo, re)
        rig.add(
            Row(
                "redis",
                f"{agent} agent, --redis vs not, req/s",
                "req/s",
                med(lo),
                med(re),
                a_label="no redis",
                b_label="--redis",
                ratio=r,
                goal=f"≥ {goal:g}",
                ok=r >= goal,
                note=f"{what}; one replica, the same rules with and without --redis; {how}",
            )
        )
        rig.add(
            Row(
                "redis",
                f"{agent} agent, --redis vs not, p50 latency",
                "ms",
                med(lo, "p50_ms"),
                med(re, "p50_ms"),
                a_label="no redis",
                b_label="--redis",
                ratio=paired(lo, re, "p50_ms"),
            )
        )
        for name, label in ((lo, "axme-fw"), (re, "axme-fw --redis")):
            rig.add(
                Row(
                    "redis",
                    f"{agent} agent, {label} vs bare mitmdump, req/s",
                    "req/s",
                    med("bare"),
                    med(name),
                    b_label=label,
                    ratio=paired("bare", name),
                )
            )
