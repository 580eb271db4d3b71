"""Section ``kill``: from ``axme-fw kill`` (or a rename of kill.yaml) to a 403 at every instance."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import statistics
from datetime import UTC, datetime

from .common import FULL, MS, now_ns, pct, timed
from .crowd import Crowd, seen_since
from .fixtures import KILLER, kill_file_revision, write_kill_file
from .report import Row, fmt_num
from .rig import Rig


async def run(rig: Rig) -> None:
    """Kill by CLI and by rename, 4 client processes; time to a 403 at every one."""
    s = rig.sizes
    fw = await rig.firewall("fw", s.agents)
    assert fw.rules is not None
    crowd = Crowd(rig)
    seconds = 300 if s is FULL else 60
    try:
        await crowd.start([fw] * 4, KILLER, seconds)
        workers = crowd.workers
        wait_all = crowd.wait_all
        await wait_all(lambda w: w.status == 200, 20, "workers to get through")
        results: dict[str, dict[str, list[float]]] = {}
        admin = "http://" + json.loads((fw.state / "enforced.json").read_text())["admin"]  # type: ignore[operator]
        for method in ("cli", "rename", "api", "server"):
            res: dict[str, list[float]] = {"all_ms": [], "first_ms": [], "cli_ack_ms": []}
            res["cli_exit_ms"] = []
            res["after_return_ms"] = []
            res["stopped_ms"] = []
            results[method] = res
            for _ in range(s.kills):
                if rig.deadline.passed() and len(res["all_ms"]) >= 5:
                    break
                entry = {
                    "agent": KILLER.agent,
                    "mode": "block",
                    "reason": "bench",
                    "by": "bench",
                    "at": datetime.now(UTC).isoformat(),
                }
                cli_proc = None
                if method == "rename":
                    prep = write_kill_file(fw.rules, [entry], rename=False)
                    t0 = now_ns()
                    os.rename(prep, fw.rules / "kill.yaml")
                elif method == "api":
                    t0 = now_ns()
                    api_call = asyncio.ensure_future(asyncio.to_thread(api_kill, admin))
                else:
                    remote = ("--server", admin) if method == "server" else ()
                    t0 = now_ns()
                    cli_proc = asyncio.ensure_future(
                        timed(rig.cli(fw, *remote, "kill", KILLER.agent, "--reason", "bench"))
                    )
                await wait_all(
                    functools.partial(seen_since, 403, t0),
                    10,
                    f"every worker to see 403 after {method} kill",
                )
                res["all_ms"].append((max(w.since for w in workers) - t0) / MS)
                res["first_ms"].append((min(w.since for w in workers) - t0) / MS)
                res["stopped_ms"].append((max(w.stopped_at(t0) for w in workers) - t0) / MS)
                if method == "api":
                    res["cli_ack_ms"].append(await api_call)
                if cli_proc is not None:
                    (code, out), exited = await cli_proc
                    res["cli_exit_ms"].append((exited - t0) / MS)
                    # The measure: from the command returning to a 403 everywhere
                    # (0 when every instance already had its 403 by then).
                    last = max(w.since for w in workers)
                    res["after_return_ms"].append(max(0.0, (last - exited) / MS))
                    m = re.search(r"(\d+) ms after the write", out)
                    if code != 0 or not m:
                        raise RuntimeError(f"axme-fw kill failed ({code}): {out.strip()}")
                    res["cli_ack_ms"].append(float(m.group(1)))
                # Resume (by rename: quick) and wait until every worker gets through again.
                t1 = now_ns()
                write_kill_file(fw.rules, [])
                await wait_all(
                    functools.partial(seen_since, 200, t1),
                    10,
                    "every worker to get through after resume",
                )
        # What starting the CLI costs on this machine under the same load.
        startup: list[float] = []
        for _ in range(5 if s is FULL else 2):
            t0 = now_ns()
            code, _out = await rig.cli(fw, "status", "--json")
            startup.append((now_ns() - t0) / MS)
        rig.details["kill"] = {
            "results_ms": results,
            "worker_errors": [w.errors for w in workers],
            "cli_status_ms": startup,
        }
        for method, res in results.items():
            label = {
                "cli": "`axme-fw kill`",
                "rename": "rename kill.yaml into place",
                "api": "admin API `POST /v1/kills`",
                "server": "`axme-fw --server URL kill`",
            }[method]
            n = len(res["all_ms"])
            note = (
                f"{n} kills, 4 client processes of one agent sending continuously; "
                "time to the first 403 seen by every instance"
            )
            if method in ("cli", "server"):
                note += (
                    f"; includes starting the CLI (Python): the CLI exits after a median "
                    f"{fmt_num(statistics.median(res['cli_exit_ms']), 'ms')} and reports the "
                    f"proxy's ack a median {fmt_num(statistics.median(res['cli_ack_ms']))} "
                    "ms after writing the kill"
                )
            rig.add(
                Row("kill", f"{label} → 403 everywhere, p50", "ms", None, pct(res["all_ms"], 50))
            )
            if method in ("cli", "server"):
                for q in (50, 99):
                    rig.add(
                        Row(
                            "kill",
                            f"{label} returned → 403 everywhere, p{q}",
                            "ms",
                            None,
                            pct(res["after_return_ms"], q),
                            note="the CLI returns once the proxy acknowledged the kill",
                        )
                    )
            p99 = pct(res["all_ms"], 99)
            rig.add(
                Row(
                    "kill",
                    f"{label} → 403 everywhere, p99",
                    "ms",
                    None,
                    p99,
                    goal="< 20 ms",
                    ok=p99 < 20,
                    note=note,
                )
            )
            rig.add(
                Row(
                    "kill",
                    f"{label} → every instance stopped (403 or cut), p99",
                    "ms",
                    None,
                    pct(res["stopped_ms"], 99),
                )
            )
        rig.add(
            Row(
                "kill",
                "CLI start-up alone (`axme-fw status --json`), median",
                "ms",
                None,
                statistics.median(startup),
                note="run while the 4 clients keep the proxy busy, as during the kills",
            )
        )
    finally:
        await crowd.stop()
        if fw.rules is not None and kill_file_revision(fw.rules) > 0:
            write_kill_file(fw.rules, [])


def api_kill(admin: str) -> float:
    """``POST /v1/kills`` for the kill worker's agent; the proxy's ``enforced_ms``."""
    import urllib.request

    token = os.environ["AXME_FW_ADMIN_TOKEN"]
    body = json.dumps({"agent": KILLER.agent, "reason": "bench"}).encode()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    req = urllib.request.Request(f"{admin}/v1/kills", body, headers, method="POST")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=10) as resp:
        return float(json.loads(resp.read())["enforced_ms"])
