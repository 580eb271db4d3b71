"""Entry point: the command line ``scripts/bench [--quick] [--check] [--only ...] [--keep]``.

Also the entry of the bench's helper processes (``python -m bench _upstream``,
``_load``, ``_killworker``), which the rig starts itself.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from . import (
    decision,
    fleet,
    kill,
    park,
    redis_cost,
    reload,
    sse,
    throughput,
    upstream,
    workers,
)
from .common import FULL, QUICK, RESULTS_JSON, RESULTS_MD, ROOT
from .report import fmt_row_values, machine_info, table_lines, write_json, write_markdown
from .rig import Rig

# The sections, in the order they run.
SECTIONS: dict[str, Callable[[Rig], Awaitable[None]]] = {
    "throughput": throughput.run,
    "sse": sse.run,
    "kill": kill.run,
    "park": park.run,
    "decision": decision.run,
    "reload": reload.run,
    "fleet": fleet.run,
    "redis": redis_cost.run,
}
HELPERS: dict[str, Callable[[list[str]], int]] = {
    "_upstream": upstream.main,
    "_load": workers.load_cli,
    "_killworker": workers.killworker_cli,
}


# Every firewall the bench starts has this admin operator (the kill section's API kills).
os.environ.setdefault("AXME_FW_ADMIN_TOKEN", "bench-admin-token-" + os.urandom(8).hex())


async def run(args: argparse.Namespace) -> int:
    """Run the chosen sections in order, print the table, write the report.

    A section that raises is recorded as failed and the next one runs. Returns 2 for an
    unknown section, 1 with ``--check`` when a goal is missed or a section failed, else 0.
    """
    sizes = QUICK if args.quick else FULL
    only = [x.strip() for x in args.only.split(",")] if args.only else list(SECTIONS)
    for name in only:
        if name not in SECTIONS:
            print(f"bench: unknown section {name!r} (known: {', '.join(SECTIONS)})")
            return 2
    info = machine_info()
    print(
        f"bench: {'quick' if args.quick else 'full'} run; {info['nproc']} cores, {info['cpu']}, "
        f"mitmproxy {info['mitmproxy']}, load average {info['loadavg_at_start'][0]:.2f}",
        flush=True,
    )
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="axme-fw-bench-"))
    rig = Rig(sizes, workdir)
    try:
        await rig.start_upstream()
        for name in SECTIONS:
            if name not in only:
                continue
            print(f"== {name} ({time.monotonic() - started:.0f} s)", flush=True)
            try:
                await asyncio.wait_for(SECTIONS[name](rig), max(rig.deadline.left(), 30) + 60)
            except Exception as exc:
                msg = f"{name}: {type(exc).__name__}: {exc}"
                print(f"bench: section failed: {msg}", flush=True)
                rig.errors.append(msg)
                if args.keep:
                    print(f"bench: logs in {workdir}")
    finally:
        await rig.procs.stop_all()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    secs = time.monotonic() - started
    print()
    print("\n".join(table_lines(rig.rows, markdown=False)))
    print(f"\nbench: {secs:.0f} s; a = baseline, b = measured, ratio b/a")
    write_json(rig, info, args, only, secs)
    write_markdown(rig, info, args, secs)
    print(f"bench: wrote {RESULTS_JSON.relative_to(ROOT)} and {RESULTS_MD.relative_to(ROOT)}")
    missed = [r for r in rig.rows if r.ok is False]
    for r in missed:
        print(f"bench: goal missed: {r.section}: {r.metric}: {fmt_row_values(r)} (goal {r.goal})")
    for e in rig.errors:
        print(f"bench: failed: {e}")
    if args.check and (missed or rig.errors):
        return 1
    return 0


def main(argv: list[str]) -> int:
    """The command line; ``_upstream``, ``_load`` and ``_killworker`` start helper processes."""
    if argv and argv[0] in HELPERS:
        return HELPERS[argv[0]](argv[1:])
    p = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Benchmark axme-fw against bare mitmdump (loopback only); writes "
        "bench/results.json and docs/benchmarks.md.",
    )
    p.add_argument("--quick", action="store_true", help="smaller counts; under a minute")
    p.add_argument("--check", action="store_true", help="exit 1 when a goal is missed")
    p.add_argument("--only", default="", help=f"comma-separated sections: {','.join(SECTIONS)}")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = p.parse_args(argv)
    args.argv = argv

    async def wrapped() -> int:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await run(args)

    try:
        return asyncio.run(wrapped())
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench: interrupted; child processes stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
