"""Section ``fleet``: three replicas sharing one redis-server: a kill acknowledged by every
replica (``axme-fw --redis URL kill``), and a kill through the admin API (``POST /v1/kills``).

Both figures run from the write to the acknowledgement: the CLI's own count, and the
API's ``enforced_ms``. Process start-up of the CLI is not in them (see ``kill``).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import statistics
import urllib.request

from .common import BIN, FULL, HOST, free_port, pct, wait_until
from .report import Row
from .rig import Rig

ACKED = re.compile(r"enforced by (\d+)/(\d+) replicas in (\d+) ms")


async def run(rig: Rig) -> None:
    exe = shutil.which("redis-server")
    if exe is None:
        rig.add(Row("fleet", "skipped: redis-server not installed", "", None, None))
        return
    import redis

    port = free_port()
    args = [exe, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"]
    await rig.procs.start(args, log=rig.workdir / "redis.log")
    client = redis.Redis(host=HOST, port=port, socket_timeout=0.5)

    def pings() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    await wait_until(pings, 10, "redis-server", step=0.02)
    url = f"redis://{HOST}:{port}/0"
    replicas = [  # their admin operator: AXME_FW_ADMIN_TOKEN (set by the bench)
        await rig.firewall(f"fleet{i}", 10, ["--redis", url, "--replica-id", f"r{i}"])
        for i in range(3)
    ]
    await wait_until(lambda: len(list(client.scan_iter("axfw:replica:*"))) == 3, 10, "heartbeats")
    trials = 30 if rig.sizes is FULL else 10
    cli_ms: list[float] = []
    for k in range(trials * 2):
        verb = "kill" if k % 2 == 0 else "resume"
        proc = await rig.procs.start(
            [BIN / "axme-fw", "--redis", url, verb, "bench-x"], pipe_out=True
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 15)
        m = ACKED.search(out.decode(errors="replace"))
        if m is None or m[1] != m[2] or m[2] != "3":
            raise RuntimeError(f"not acknowledged by 3/3 replicas: {out!r}")
        cli_ms.append(float(m[3]))
    state = replicas[0].state
    assert state is not None
    admin = json.loads((state / "enforced.json").read_text())["admin"]
    api_ms: list[float] = []
    for k in range(trials * 2):
        api_ms.append(await asyncio.to_thread(_api_change, admin, k % 2 == 0))
    rig.details["fleet"] = {"cli_ms": cli_ms, "api_ms": api_ms}
    for label, values in (
        ("`axme-fw --redis kill` → acknowledged by 3/3 replicas", cli_ms),
        ("admin API POST /v1/kills → acknowledged by 3/3 replicas", api_ms),
    ):
        rig.add(Row("fleet", f"{label}, p50", "ms", None, statistics.median(values)))
        rig.add(Row("fleet", f"{label}, p99", "ms", None, pct(values, 99)))


def _api_change(admin: str, kill: bool) -> float:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    token = os.environ["AXME_FW_ADMIN_TOKEN"]  # set by the bench at start, after imports
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    if kill:
        body = json.dumps({"agent": "bench-y", "reason": "bench"}).encode()
        req = urllib.request.Request(f"http://{admin}/v1/kills", body, headers, method="POST")
    else:
        req = urllib.request.Request(
            f"http://{admin}/v1/kills/bench-y", None, headers, method="DELETE"
        )
    with opener.open(req, timeout=10) as resp:
        return float(json.loads(resp.read())["enforced_ms"])
