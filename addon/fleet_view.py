"""State: the fleet as Redis holds it, for people: every replica (id, address, revision
enforced, last heartbeat, in sync or lost), the shared kill list, and every agent as all
the replicas saw it. Blocking; read by ``axme-fw --redis URL status`` and by the admin API
(``GET /v1/status`` on a replica, in a worker thread), so both show the same fleet."""

from __future__ import annotations

from typing import Any

import redis

from .health import merge
from .redis_ops import USED, published, read_kills, replicas, window_keys
from .yamlnodes import format_duration


def view(r: redis.Redis, now: float) -> dict[str, Any]:
    """``{"revision", "kills", "replicas", "agents"}``; raises what Redis raises."""
    revision, kills = read_kills(r)
    rows = [
        {
            "replica": rid,
            "listen": rep.get("listen") or [],
            "revision": rep["acked"],
            "last_heartbeat_s": round(now - float(str(rep.get("at", now))), 1),
            "in_sync": rep["acked"] >= revision and "lost_s" not in rep,
            "lost": "lost_s" in rep,  # no heartbeat: down, or cut off from Redis
        }
        for rid, rep in sorted(replicas(r).items())
    ]
    names = [k.agent for k in kills]
    return {"revision": revision, "kills": names, "replicas": rows, "agents": _agents(r, now)}


def lines(data: dict[str, Any]) -> list[str]:
    """``data`` (a :func:`view`) as text, a line per replica, agent and limit."""
    out = [f"kill list revision {data['revision']}: {', '.join(data['kills']) or 'no kills'}"]
    for row in data["replicas"]:
        sync = "LOST (no heartbeat)" if row["lost"] else "in sync" if row["in_sync"] else "BEHIND"
        where = ", ".join(row["listen"]) or "-"
        out.append(
            f"  {row['replica']:<20} {where:<22} revision {row['revision']:<5} "
            f"heartbeat {row['last_heartbeat_s']}s ago  {sync}"
        )
    if not data["replicas"]:
        out.append("  no replica is running")
    for a in data["agents"]:
        insts = ", ".join(a["instances"]) or "-"
        seen = "never seen" if a["last_seen_s"] is None else f"last seen {a['last_seen_s']}s ago"
        out.append(f"  agent {a['agent']:<16} {seen}, {a['requests']} requests, instances: {insts}")
        for row in a["limits"]:
            cap = "no ceiling" if row["max"] is None else f"max {row['max']:g}"
            per = format_duration(float(row["per"]))
            out.append(f"    {row['key']:<22} {row['used']:.6g} used ({cap} per {per})")
    return out


def _agents(r: redis.Redis, now: float) -> list[dict[str, Any]]:
    """Each agent as the whole fleet saw it (the replicas' published health, merged), and
    its limits (as the replica that published last has them) and their use, read from
    Redis now."""
    snaps = sorted(published(r), key=lambda s: float(s.get("at") or 0))
    fleet = merge([s.get("health") or {} for s in snaps])
    limits: dict[str, list[dict[str, Any]]] = {}
    for snap in snaps:  # oldest first: the freshest rows win
        limits.update(snap.get("limits") or {})
    _read_spend(r, limits, now)
    out = []
    for agent in sorted(set(fleet.agents) | set(limits)):
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


def _read_spend(r: redis.Redis, limits: dict[str, list[dict[str, Any]]], now: float) -> None:
    """Replace each row's ``used`` by the window's value in Redis at ``now`` (one call)."""
    asked = [(agent, row) for agent, agent_rows in limits.items() for row in agent_rows]
    if not asked:
        return
    keys = [k for agent, row in asked for k in window_keys(agent, row["key"])[:2]]
    got = r.register_script(USED)(keys=keys, args=[now, *[float(row["per"]) for _, row in asked]])
    for (_agent, row), used in zip(asked, got, strict=True):
        row["used"] = float(used)
