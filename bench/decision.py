"""Section ``decision``: ``policy.decide`` and the proxy, with 10 up to 10,000 agents."""

from __future__ import annotations

import time

from .common import HOST, ratio
from .fixtures import gen_token, write_rules
from .report import Row
from .rig import Rig
from .throughput import interleaved


def decide_bench(rig: Rig) -> None:
    """Microbenchmark ``policy.decide`` with 10, 1,000 and 10,000 agents."""
    from axme_fw.policy import Facts, decide
    from axme_fw.rules import Loader

    s = rig.sizes
    sizes = (10, 1000, s.big_agents)
    rulesets = {}
    load_s = {}
    for n in sizes:
        d = rig.workdir / f"decide-{n}"
        write_rules(d, n, s.actions, park_max=1000)
        t0 = time.perf_counter()
        rulesets[n] = Loader(d).load()
        load_s[n] = time.perf_counter() - t0
    # The probe: a generated agent in the middle, allowed via `local` after 5 actions.
    facts = {
        n: Facts(f"a{(n - 3) // 2:05d}", gen_token((n - 3) // 2), HOST, rig.up_http, "GET", "/v1/x")
        for n in sizes
    }
    best: dict[int, float] = {n: float("inf") for n in sizes}
    for n in sizes:
        d0 = decide(rulesets[n], facts[n])
        if d0.refused:
            raise RuntimeError(f"decide probe refused with {n} agents: {d0}")
    for _ in range(s.decide_samples):
        for n in sizes:
            rs, f = rulesets[n], facts[n]
            t0 = time.perf_counter_ns()
            for _ in range(s.decide_calls):
                decide(rs, f)
            best[n] = min(best[n], (time.perf_counter_ns() - t0) / s.decide_calls / 1000)
    rig.details["decide"] = {
        "us_per_call_min": {str(n): best[n] for n in sizes},
        "load_seconds": {str(n): round(load_s[n], 3) for n in sizes},
    }
    note = (
        f"min over {s.decide_samples} samples of {s.decide_calls} calls; {s.actions} actions; "
        f"rules load {', '.join(f'{n:,}: {load_s[n]:.2f} s' for n in sizes)}"
    )
    r1 = ratio(best[10], best[1000])
    rig.add(
        Row(
            "decision",
            "decide() per call, 1,000 vs 10 agents",
            "µs",
            best[10],
            best[1000],
            a_label="10 agents",
            b_label="1,000 agents",
            ratio=r1,
        )
    )
    r = ratio(best[10], best[s.big_agents])
    rig.add(
        Row(
            "decision",
            f"decide() per call, {s.big_agents:,} vs 10 agents",
            "µs",
            best[10],
            best[s.big_agents],
            a_label="10 agents",
            b_label=f"{s.big_agents:,} agents",
            ratio=r,
            goal="≤ 1.2",
            ok=r is not None and r <= 1.2,
            note=note,
        )
    )


async def run(rig: Rig) -> None:
    """``decide()`` per call by rule-set size, and req/s through 10 vs 10,000 agents."""
    s = rig.sizes
    decide_bench(rig)
    small = await rig.firewall("fw10", 10)
    big = await rig.firewall("fw10k", s.big_agents)
    runs, paired, med2 = await interleaved(rig, small, big, "http")
    med = {"10": med2["a"]["rps"], "big": med2["b"]["rps"]}
    rig.details["decision_proxy"] = {
        "runs": {"10": runs["a"], "big": runs["b"]},
        "paired_ratio_median": paired,
        "startup_seconds": {"10": small.started_s, "big": big.started_s},
    }
    r = paired["rps"]
    rig.add(
        Row(
            "decision",
            f"HTTP req/s through axme-fw, {s.big_agents:,} vs 10 agents",
            "req/s",
            med["10"],
            med["big"],
            a_label="10 agents",
            b_label=f"{s.big_agents:,} agents",
            ratio=r,
            goal="≥ 0.95",
            ok=r >= 0.95,
            note="b/a: median of adjacent-run ratios; proxy start-up "
            f"{small.started_s:.1f} s (10) vs {big.started_s:.1f} s "
            f"({s.big_agents:,})",
        )
    )
    await rig.stop_proxy("fw10")
