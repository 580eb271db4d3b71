"""Section ``throughput``: req/s and p50/p99 through bare mitmdump and axme-fw, interleaved."""

from __future__ import annotations

import statistics

from .fixtures import BENCH
from .report import Row
from .rig import Proxy, Rig


async def interleaved(
    rig: Rig, a: Proxy, b: Proxy, mode: str
) -> tuple[dict[str, list[dict[str, float]]], dict[str, float], dict[str, dict[str, float]]]:
    """Alternate load runs a, b, b, a, a, b, ... (each pair adjacent in time).

    Returns the runs, the median over pairs of b/a for each metric (a drifting
    background load cancels out of adjacent pairs), and the median value per proxy.
    """
    s = rig.sizes
    runs: dict[str, list[dict[str, float]]] = {"a": [], "b": []}
    for k in range(s.rounds):
        if rig.deadline.passed() and runs["a"]:
            break
        order = (("a", a), ("b", b)) if k % 2 == 0 else (("b", b), ("a", a))
        for name, proxy in order:
            runs[name].append(await rig.load(proxy, mode, s.seconds, BENCH))
    keys = ("rps", "p50_ms", "p99_ms")
    paired = {
        key: statistics.median(
            rb[key] / ra[key] for ra, rb in zip(runs["a"], runs["b"], strict=True)
        )
        for key in keys
    }
    med = {
        name: {key: statistics.median(r[key] for r in rs) for key in keys}
        for name, rs in runs.items()
    }
    return runs, paired, med


async def run(rig: Rig) -> None:
    """HTTP and HTTPS keep-alive req/s and latency, bare mitmdump (a) vs the firewall (b)."""
    s = rig.sizes
    bare = await rig.bare()
    fw = await rig.firewall("fw", s.agents)
    for mode in ("http", "https"):
        runs, paired, med = await interleaved(rig, bare, fw, mode)
        rig.details[f"throughput_{mode}"] = {
            "runs": {"bare": runs["a"], "fw": runs["b"]},
            "median": {"bare": med["a"], "fw": med["b"]},
            "paired_ratio_median": paired,
        }
        label = "HTTP keep-alive" if mode == "http" else "HTTPS (CONNECT+TLS) keep-alive"
        tool = rig.load_tool if mode == "http" else "python"
        r = paired["rps"]
        rig.add(
            Row(
                "throughput",
                f"{label} req/s",
                "req/s",
                med["a"]["rps"],
                med["b"]["rps"],
                ratio=r,
                goal="≥ 0.95",
                ok=r >= 0.95,
                note=f"{len(runs['b'])} runs of {s.seconds:g} s per proxy, interleaved, "
                f"{s.conns} connections ({tool}); a, b: medians; b/a: median of the ratios "
                f"of adjacent runs; firewall with {s.agents:,} agents, {s.actions} actions",
            )
        )
        for key, what in (("p50_ms", "p50"), ("p99_ms", "p99")):
            rig.add(
                Row(
                    "throughput",
                    f"{label} {what} latency",
                    "ms",
                    med["a"][key],
                    med["b"][key],
                    ratio=paired[key],
                )
            )
    await rig.stop_proxy("bare")
