"""Section ``fleet``: three replicas sharing one redis-server.

- A kill acknowledged by every replica (``axme-fw --redis URL kill``, and the admin API
  ``POST /v1/kills``), no traffic: from the write to the acknowledgement, the CLI's own
  count and the API's ``enforced_ms``; and the CLI command's whole run, start-up included.
- Kill propagation to traffic: 4 instances of one agent (kill workers, as in ``kill``)
  spread over the 3 replicas (r0, r1, r2, r0); from just before the kill call to the
  first 403 seen by every instance, API and CLI kills alternating. The CLI figure
  includes starting the CLI (Python). Each kill is undone through the admin API of
  another replica, and every instance must get through again before the next kill.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import statistics
import urllib.request
from pathlib import Path

from .common import BIN, FULL, MS, now_ns, pct, timed, wait_until
from .crowd import Crowd, seen_since
from .fixtures import KILLER
from .redis_server import start_redis
from .report import Row, fmt_num
from .rig import Proxy, Rig

ACKED = re.compile(r"enforced by (\d+)/(\d+) replicas in (\d+) ms")


async def run(rig: Rig) -> None:
    server = await start_redis(rig, "fleet-redis")
    if server is None:
        rig.add(Row("fleet", "skipped: redis-server not installed", "", None, None))
        return
    client, url = server.client, server.url
    replicas = [  # their admin operator: AXME_FW_ADMIN_TOKEN (set by the bench)
        await rig.firewall(f"fleet{i}", 10, ["--redis", url, "--replica-id", f"r{i}"])
        for i in range(3)
    ]
    try:
        await wait_until(
            lambda: len(list(client.scan_iter("axfw:replica:*"))) == 3, 10, "heartbeats"
        )
        await acks(rig, url, replicas)
        await propagation(rig, url, replicas)
    finally:
        for p in replicas:
            await rig.stop_proxy(p.name)
        await rig.procs.stop(server.proc)


def admin_of(proxy: Proxy) -> str:
    """The replica's admin API address (``host:port``), from its enforced.json."""
    assert proxy.state is not None
    return str(json.loads((proxy.state / "enforced.json").read_text())["admin"])


async def fleet_cli(rig: Rig, url: str, verb: str, agent: str) -> str:
    """``axme-fw --redis URL VERB AGENT``; its output, RuntimeError unless 3/3 acknowledged."""
    cmd: list[str | Path] = [BIN / "axme-fw", "--redis", url, verb, agent, "--reason", "bench"]
    proc = await rig.procs.start(cmd, pipe_out=True)
    try:
        out_b, _ = await asyncio.wait_for(proc.communicate(), 15)
    finally:
        await rig.procs.stop(proc)
    out = out_b.decode(errors="replace")
    m = ACKED.search(out)
    if m is None or m[1] != m[2] or m[2] != "3":
        raise RuntimeError(f"{verb} {agent}: not acknowledged by 3/3 replicas: {out!r}")
    return out


async def acks(rig: Rig, url: str, replicas: list[Proxy]) -> None:
    """Write → acknowledged by 3/3 replicas, by the CLI's and the API's own counts."""
    trials = 30 if rig.sizes is FULL else 10
    cli_ms: list[float] = []
    wall_ms: list[float] = []
    for k in range(trials * 2):
        t0 = now_ns()
        out = await fleet_cli(rig, url, "kill" if k % 2 == 0 else "resume", "bench-x")
        wall_ms.append((now_ns() - t0) / MS)
        m = ACKED.search(out)
        assert m is not None
        cli_ms.append(float(m[3]))
    admin = admin_of(replicas[0])
    api_ms: list[float] = []
    for k in range(trials * 2):
        api_ms.append(await asyncio.to_thread(api_change, admin, "bench-y", k % 2 == 0))
    rig.details["fleet"] = {"cli_ms": cli_ms, "cli_wall_ms": wall_ms, "api_ms": api_ms}
    for label, values in (
        ("`axme-fw --redis kill` → acknowledged by 3/3 replicas", cli_ms),
        ("`axme-fw --redis kill`, the whole command (Python start-up to exit)", wall_ms),
        ("admin API POST /v1/kills → acknowledged by 3/3 replicas", api_ms),
    ):
        rig.add(Row("fleet", f"{label}, p50", "ms", None, statistics.median(values)))
        rig.add(Row("fleet", f"{label}, p99", "ms", None, pct(values, 99)))


async def propagation(rig: Rig, url: str, replicas: list[Proxy]) -> None:
    """4 instances over 3 replicas: kill call → a 403 at every instance, API and CLI."""
    s = rig.sizes
    crowd = Crowd(rig)
    seconds = 300 if s is FULL else 60
    kill_at, resume_at = admin_of(replicas[0]), admin_of(replicas[1])
    res: dict[str, dict[str, list[float]]] = {
        m: {"all_ms": [], "first_ms": [], "ack_ms": [], "returned_ms": []} for m in ("api", "cli")
    }
    try:
        await crowd.start([replicas[0], replicas[1], replicas[2], replicas[0]], KILLER, seconds)
        await crowd.wait_all(lambda w: w.status == 200, 20, "workers to get through")
        for k in range(s.kills):
            if rig.deadline.passed() and len(res["cli"]["all_ms"]) >= 3:
                break
            for method in ("api", "cli") if k % 2 == 0 else ("cli", "api"):
                r = res[method]
                t0 = now_ns()
                call = asyncio.ensure_future(timed(kill_call(rig, url, method, kill_at)))
                await crowd.wait_all(
                    functools.partial(seen_since, 403, t0),
                    10,
                    f"every instance to see 403 after the {method} kill",
                )
                r["all_ms"].append((crowd.last_since() - t0) / MS)
                r["first_ms"].append((crowd.first_since() - t0) / MS)
                ack_ms, returned = await call
                r["ack_ms"].append(ack_ms)
                r["returned_ms"].append((returned - t0) / MS)
                t1 = now_ns()
                await asyncio.to_thread(api_change, resume_at, KILLER.agent, False)
                await crowd.wait_all(
                    functools.partial(seen_since, 200, t1),
                    10,
                    "every instance to get through after the resume",
                )
    finally:
        await crowd.stop()
    rig.details["fleet_propagation"] = {
        "results_ms": res,
        "instances": [w.proxy for w in crowd.workers],
        "worker_errors": [w.errors for w in crowd.workers],
    }
    for method, label in (
        ("api", "admin API POST /v1/kills on r0"),
        ("cli", "`axme-fw --redis kill` (incl. Python start-up)"),
    ):
        r = res[method]
        note = (
            f"{len(r['all_ms'])} kills, API and CLI alternating; 4 instances of one agent "
            "sending continuously through r0, r1, r2, r0; from just before the call to the "
            f"first 403 seen by the last instance; the call returned after a median "
            f"{fmt_num(statistics.median(r['returned_ms']), 'ms')} (write → 3/3 acks: "
            f"{fmt_num(statistics.median(r['ack_ms']), 'ms')})"
        )
        for q in (50, 99):
            rig.add(
                Row(
                    "fleet",
                    f"{label} → 403 at 4 instances on 3 replicas, p{q}",
                    "ms",
                    None,
                    pct(r["all_ms"], q),
                    note=note if q == 99 else "",
                )
            )


async def kill_call(rig: Rig, url: str, method: str, admin: str) -> float:
    """Kill the kill workers' agent by ``method`` (api, cli); write → 3/3 acks in ms."""
    if method == "api":
        return await asyncio.to_thread(api_change, admin, KILLER.agent, True)
    m = ACKED.search(await fleet_cli(rig, url, "kill", KILLER.agent))
    assert m is not None
    return float(m[3])


def api_change(admin: str, agent: str, kill: bool) -> float:
    """``POST /v1/kills`` (or ``DELETE /v1/kills/AGENT``) on one replica: its ``enforced_ms``."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    token = os.environ["AXME_FW_ADMIN_TOKEN"]  # set by the bench at start, after imports
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    if kill:
        body = json.dumps({"agent": agent, "reason": "bench"}).encode()
        req = urllib.request.Request(f"http://{admin}/v1/kills", body, headers, method="POST")
    else:
        req = urllib.request.Request(
            f"http://{admin}/v1/kills/{agent}", None, headers, method="DELETE"
        )
    with opener.open(req, timeout=10) as resp:
        data = json.loads(resp.read())
    if "enforced_ms" not in data:
        raise RuntimeError(f"{'kill' if kill else 'resume'} {agent} not confirmed: {data}")
    return float(data["enforced_ms"])
