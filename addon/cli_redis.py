"""CLI: ``axme-fw --redis URL kill|pause|resume``: one write to the kill list every replica
shares, then wait until every live replica acknowledges it (2 s at most)."""

from __future__ import annotations

import time

import click

from .audit import now_iso
from .cli_common import fail
from .ruleset import Kill

WAIT = 2.0


def change(url: str, agent: str, mode: str | None, reason: str, by: str) -> None:
    """Kill or pause ``agent`` (``mode``), or resume it (None), for every replica."""
    import redis

    from .redis_store import connect, redact, replicas, write_kill

    r = connect(url, timeout=2.0)
    started = time.monotonic()
    kill = None if mode is None else Kill(agent, mode, reason, by, now_iso())  # type: ignore[arg-type]
    verb = "resumed" if mode is None else ("paused" if mode == "park" else "killed")
    try:
        revision = write_kill(r, agent, kill)
        while True:
            live = replicas(r)
            behind = sorted(rid for rid, rep in live.items() if rep["acked"] < revision)
            if not behind or time.monotonic() - started >= WAIT:
                break
            time.sleep(0.002)
    except redis.RedisError as exc:
        fail(f"cannot reach Redis at {redact(url)}: {exc}")
    ms = (time.monotonic() - started) * 1000
    done = len(live) - len(behind)
    if not live:
        fail(f"{verb} {agent} in Redis (revision {revision}), but no replica is running")
    if behind:
        fail(
            f"{verb} {agent}: enforced by {done}/{len(live)} replicas; not acknowledged "
            f"within {WAIT:g} s by {', '.join(behind)}"
        )
    click.echo(f"{verb} {agent}: enforced by {done}/{len(live)} replicas in {ms:.0f} ms")
