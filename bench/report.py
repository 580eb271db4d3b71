"""Shared rig: result rows and the report (the table, results.json, docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .common import RESULTS_JSON, RESULTS_MD, ROOT

if TYPE_CHECKING:
    from .rig import Rig


@dataclass
class Row:
    """One line of the results table; ``ok`` is None when the row has no goal."""

    section: str
    metric: str
    unit: str
    a: float | None  # the baseline (bare mitmdump unless a_label says otherwise)
    b: float | None  # the firewall (or the single measured value)
    a_label: str = "bare"
    b_label: str = "axme-fw"
    ratio: float | None = None  # b / a
    goal: str = ""
    ok: bool | None = None  # None: informational, no goal
    note: str = ""


def fmt_num(v: float | None, unit: str = "") -> str:
    """``v`` with 3 significant digits or thousands separators; "—" for None or NaN."""
    if v is None or v != v:  # None or NaN
        return "—"
    if abs(v) >= 1000:
        s = f"{v:,.0f}"
    elif abs(v) >= 100:
        s = f"{v:.0f}"
    elif abs(v) >= 10:
        s = f"{v:.1f}"
    else:
        s = f"{v:.2f}"
    return f"{s} {unit}".strip()


def fmt_row_values(row: Row) -> str:
    """The a, b and b/a columns of the progress line printed as each row is added."""
    a = fmt_num(row.a, row.unit)
    b = fmt_num(row.b, row.unit)
    r = f"{row.ratio:.3f}" if row.ratio is not None else "—"
    return f"a={a:<14} b={b:<14} b/a={r}"


def machine_info() -> dict[str, Any]:
    """CPU, versions, load average and commit, for the report's "This run" list."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mitm = "unknown"
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        mitm = version("mitmproxy")
    wrk = "not installed"
    if shutil.which("wrk"):
        with contextlib.suppress(Exception):
            res = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=5)
            wrk = (res.stdout + res.stderr).split("\n")[0].split(" Copyright")[0].strip()
    commit = ""
    with contextlib.suppress(Exception):
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "mitmproxy": mitm,
        "wrk": wrk,
        "kernel": platform.release(),
        "loadavg_at_start": os.getloadavg(),
        "commit": commit,
    }


def table_lines(rows: Sequence[Row], markdown: bool) -> list[str]:
    """The results table, as Markdown or as aligned plain text."""
    head = ["Section", "Metric", "a", "b", "b/a", "Goal", "Pass"]
    body = []
    for r in rows:
        a = fmt_num(r.a, r.unit) + (f" ({r.a_label})" if r.a is not None else "")
        b = fmt_num(r.b, r.unit) + (f" ({r.b_label})" if r.a is not None else "")
        passed = "—" if r.ok is None else ("yes" if r.ok else "**NO**" if markdown else "NO")
        rat = f"{r.ratio:.3f}" if r.ratio is not None else "—"
        body.append([r.section, r.metric, a, b, rat, r.goal or "—", passed])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
        return out
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in body]
    return out


def write_markdown(rig: Rig, info: dict[str, Any], args: argparse.Namespace, secs: float) -> None:
    """Write docs/benchmarks.md: how to rerun, this run's machine and sizes, the table, notes."""
    s = rig.sizes
    lines = [
        "# Benchmarks",
        "",
        "Written by `scripts/bench` (do not edit by hand; rerun it). The firewall (`axme-fw "
        "run`, b) and bare `mitmdump` (a) run side by side in one run, on loopback only, "
        "against a local upstream written in `bench/upstream.py`. Ratios are b/a.",
        "",
        "## Reproduce",
        "",
        "```sh",
        "scripts/bench            # full run, < 10 min; writes bench/results.json and this page",
        "scripts/bench --quick    # smaller counts, < 1 min",
        "scripts/bench --check    # exit 1 when a goal is missed",
        "```",
        "",
        "## This run",
        "",
        f"- command: `scripts/bench {' '.join(args.argv)}`".rstrip() + f" ({secs:.0f} s)",
        f"- machine: {info['nproc']} cores, {info['cpu']}, Linux {info['kernel']}, load "
        f"average at start {', '.join(f'{x:.2f}' for x in info['loadavg_at_start'])}",
        f"- date: {info['date']}; commit {info['commit'] or 'unknown'}",
        f"- Python {info['python']}, mitmproxy {info['mitmproxy']}, load generator: "
        + (
            f"{info['wrk']} for plain HTTP, a Python asyncio generator for HTTPS"
            if rig.load_tool == "wrk"
            else "a Python asyncio generator (wrk not installed)"
        ),
        f"- sizes: {s.agents:,} agents and {s.actions} actions in the firewall's rules; "
        f"throughput {s.rounds} runs of {s.seconds:g} s per proxy and protocol, "
        f"{s.conns} connections; "
        f"{s.kills} kills per method; {s.park_flows:,} parked flows; "
        f"{s.big_agents:,} agents for the decision and reload tests",
        "",
        "## Results",
        "",
        *table_lines(rig.rows, markdown=True),
        "",
    ]
    if rig.errors:
        lines += ["## Sections that failed", "", *[f"- {e}" for e in rig.errors], ""]
    notes = [r for r in rig.rows if r.note]
    if notes:
        lines += ["## Notes", ""]
        lines += [f"- **{r.section}, {r.metric}**: {r.note}" for r in notes]
        lines.append("")
    lines += [
        "## How it measures",
        "",
        "- **Throughput**: both proxies run at once with `connection_strategy=lazy`; runs "
        "alternate bare, firewall, bare, firewall, … and the median is reported. Plain HTTP "
        "sends absolute-form requests with `Proxy-Authorization` on keep-alive connections; "
        "HTTPS opens a CONNECT tunnel, TLS with the proxy's CA (the upstream's certificate "
        "comes from `trustme`, trusted via `ssl_verify_upstream_trusted_ca`), then keep-alive "
        "requests. The upstream answers a fixed ~100-byte JSON body.",
        "- **Kill**: 4 separate client processes of one agent loop on keep-alive connections "
        "and report the CLOCK_MONOTONIC time of every status change; the time is from just "
        "before starting `axme-fw kill` (or `rename(2)` of a prepared `kill.yaml`) to the "
        "first 403 seen by the last of the four. Each kill is undone (by renaming an empty "
        "kill list into place) and every worker must get through again before the next.",
        "- **Park**: `axme-fw pause`, then N requests, each on its own connection, written in "
        "order; the audit log's `decision`/`park` records show when all are held; RSS is the "
        "proxy's VmRSS before and after. Then `axme-fw resume`; the upstream records arrival "
        "order and time. 'Out of place' counts positions where the upstream's arrival order "
        "differs from send order; send order is the best available proxy for the order in "
        "which the proxy parked them.",
        "- **Decision**: `policy.decide` on a `Ruleset` from `rules.Loader` over generated "
        "files, for an agent in the middle of the file whose request matches its 6th allowed "
        "action.",
        "- **Reload**: the 10,000-agent `agents.yaml` is rewritten beside itself and renamed "
        "over the original with one more agent; a client of that agent polls on a keep-alive "
        "connection until it gets 200.",
        "- **Fleet**: a redis-server started by the bench (loopback, no persistence) and 3 "
        "replicas (`--redis`); 4 kill workers of one agent send through r0, r1, r2, r0; API "
        "kills (`POST /v1/kills` on r0) and CLI kills (`axme-fw --redis URL kill`, a new "
        "Python process each time) alternate; each is undone by `DELETE /v1/kills/AGENT` on "
        "r1 and every worker must get 200 again before the next.",
        "- **Redis**: one firewall with `--redis` and one without (same rules), bare mitmdump "
        "too, in rounds whose order reverses each round; ratios are medians over rounds. "
        "Commands per request are counted with `MONITOR` (a client's commands apart from "
        "those its Lua scripts run) over N sequential requests, less the replica's own "
        "commands over an idle interval of the same length.",
        "",
    ]
    RESULTS_MD.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_MD.write_text("\n".join(lines))


def write_json(
    rig: Rig, info: dict[str, Any], args: argparse.Namespace, only: Sequence[str], secs: float
) -> None:
    """Write bench/results.json: machine, command, sizes, rows, per-section details, errors."""
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_JSON.write_text(
        json.dumps(
            {
                "machine": info,
                "command": f"scripts/bench {' '.join(args.argv)}".strip(),
                "quick": bool(args.quick),
                "sections": list(only),
                "seconds": round(secs, 1),
                "sizes": asdict(rig.sizes),
                "rows": [asdict(r) for r in rig.rows],
                "details": rig.details,
                "errors": rig.errors,
            },
            indent=2,
            default=str,
        )
        + "\n"
    )
