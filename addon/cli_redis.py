"""CLI: ``axme-fw --redis URL kill|pause|resume``: one write to the kill list every replica
shares, then wait until every live replica acknowledges it (2 s at most)."""

from __future__ import annotations

import time
from typing import Any

import click

from .audit import now_iso
from .cli_common import fail
from .ruleset import Kill
from .yamlnodes import format_duration

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
    (lost: registered, but no heartbeat lately)."""
    import json

    import redis

    from .redis_ops import connect, read_kills, replicas

    r = connect(url, timeout=2.0)
    try:
        revision, kills = read_kills(r)
        live = replicas(r)
    except redis.RedisError as exc:
        fail(unreachable(url, exc))
    now = time.time()
    rows = [
        {
            "replica": rid,
            "listen": rep.get("listen") or [],
            "revision": rep["acked"],
            "last_heartbeat_s": round(now - float(str(rep.get("at", now))), 1),
            "in_sync": rep["acked"] >= revision and "lost_s" not in rep,
            "lost": "lost_s" in rep,  # no heartbeat: down, or cut off from Redis
        }
        for rid, rep in sorted(live.items())
    ]
    names = [k.agent for k in kills]
    agents = _fleet_agents(r, now)
    data = {"revision": revision, "kills": names, "replicas": rows, "agents": agents}
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"kill list revision {revision}: {', '.join(names) or 'no kills'}")
    for row in rows:
        sync = "LOST (no heartbeat)" if row["lost"] else "in sync" if row["in_sync"] else "BEHIND"
        where = ", ".join(row["listen"]) or "-"
        click.echo(
            f"  {row['replica']:<20} {where:<22} revision {row['revision']:<5} "
            f"heartbeat {row['last_heartbeat_s']}s ago  {sync}"
        )
    if not rows:
        click.echo("  no replica is running")
    for a in agents:
        insts = ", ".join(a["instances"]) or "-"
        seen = "never seen" if a["last_seen_s"] is None else f"last seen {a['last_seen_s']}s ago"
        click.echo(f"  agent {a['agent']:<16} {seen}, {a['requests']} requests, instances: {insts}")
        for row in a["limits"]:
            cap = "no ceiling" if row["max"] is None else f"max {row['max']:g}"
            per = format_duration(float(row["per"]))
            click.echo(f"    {row['key']:<22} {row['used']:.6g} used ({cap} per {per})")


def _fleet_agents(r: Any, now: float) -> list[dict[str, Any]]:
    """Each agent as the whole fleet saw it (the replicas' published health, merged), and
    its limits (as the replica that published last has them) and their use, read from
    Redis now."""
    from .health import merge
    from .redis_ops import published

    snaps = sorted(published(r), key=lambda s: float(s.get("at") or 0))
    fleet = merge([s.get("health") or {} for s in snaps])
    limits: dict[str, list[dict[str, Any]]] = {}
    for snap in snaps:  # oldest first: the freshest rows win
        limits.update(snap.get("limits") or {})
    _read_spend(r, limits, now)
    names = sorted(set(fleet.agents) | set(limits))
    out = []
    for agent in names:
        seen = fleet.agents.get(agent)
        out.append(
            {
                "agent": agent,
                "last_seen_s": round(now - seen.last, 1) if seen is not None else None,
                "requests": seen.requests if seen is not None else 0,
                "instances": sorted(fleet.instances.get(agent, {})),
                "limits": limits.get(agent, []),
            }
        )
    return out


def _read_spend(r: Any, limits: dict[str, list[dict[str, Any]]], now: float) -> None:
    """Replace each row's ``used`` by the window's value in Redis at ``now`` (one call)."""
    from .redis_ops import USED, window_keys

    rows = [row for agent_rows in limits.values() for row in agent_rows]
    asked = [(agent, row) for agent, agent_rows in limits.items() for row in agent_rows]
    if not rows:
        return
    keys = [k for agent, row in asked for k in window_keys(agent, row["key"])[:2]]
    got = r.register_script(USED)(keys=keys, args=[now, *[float(row["per"]) for row in rows]])
    for row, used in zip(rows, got, strict=True):
        row["used"] = float(used)
