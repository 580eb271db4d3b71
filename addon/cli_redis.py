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

    from .redis_ops import change_and_wait, connect

    kill = None if mode is None else Kill(agent, mode, reason, by, now_iso())  # type: ignore[arg-type]
    verb = "resumed" if mode is None else ("paused" if mode == "park" else "killed")
    try:
        revision, live, behind, ms = change_and_wait(connect(url, 2.0), agent, kill, WAIT)
    except redis.RedisError as exc:
        fail(unreachable(url, exc))
    done = len(live) - len(behind)
    if not live:
        fail(f"{verb} {agent} in Redis (revision {revision}), but no replica is running")
    if behind:
        fail(
            f"{verb} {agent}: enforced by {done}/{len(live)} replicas; not acknowledged "
            f"within {WAIT:g} s by {', '.join(behind)}"
        )
    click.echo(
        f"{verb} {agent}: enforced by {done}/{len(live)} replicas in {ms:.0f} ms "
        f"(revision {revision})"
    )


def unreachable(url: str, exc: Exception) -> str:
    """One line for a Redis the CLI could not use: refused credentials said as such."""
    import redis

    from .redis_ops import redact

    if isinstance(exc, redis.AuthenticationError):
        return f"Redis at {redact(url)} refused the credentials in the URL: {exc}"
    return f"cannot reach Redis at {redact(url)}: {exc}"


def status(url: str, as_json: bool) -> None:
    """Every replica: id, address, kill-list revision enforced, last heartbeat, in sync
    (lost: registered, but no heartbeat lately); every agent as the fleet saw it."""
    import json

    import redis

    from .fleet_view import lines, view
    from .redis_ops import connect

    try:
        data = view(connect(url, timeout=2.0), time.time())
    except redis.RedisError as exc:
        fail(unreachable(url, exc))
    click.echo(json.dumps(data, indent=2) if as_json else "\n".join(lines(data)))
