"""CLI: ``axme-fw status``: what every agent is doing, from the state directory.

Reads what the proxy publishes (``live.json``, refreshed a few times a second) or, when
no proxy is running, its durable copy (``state.json``) — and says which. Never talks
to the proxy, so it works when the proxy is down.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from .health import Health, stale_after
from .killswitch import read_enforced
from .limits import Windows
from .meter import usage_rows
from .ruleset import Ruleset, is_pattern
from .state import STORE_FILE, Snapshots, read_live
from .yamlnodes import format_duration


def _pid_alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _durable(state_dir: Path) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    if not (state_dir / STORE_FILE).exists():
        return None, None
    store = Snapshots(state_dir)
    try:
        return store.load("windows"), store.load("health")
    finally:
        store.close()


def gather(rules: Ruleset, state_dir: Path, now: float | None = None) -> dict[str, Any]:
    """Everything ``status`` shows, as JSON-ready data (``status --json`` prints it as is)."""
    now = time.time() if now is None else now
    live = read_live(state_dir)
    running = live is not None and _pid_alive(live.get("pid"))
    enforced = read_enforced(state_dir)
    if running and live is not None:
        health = Health.restore(live.get("health") or {})
        usage: dict[str, list[dict[str, Any]]] = live.get("limits") or {}
        parked: dict[str, int] = live.get("parked") or {}
        source = "proxy"
    else:
        saved_windows, saved_health = _durable(state_dir)
        health = Health.restore(saved_health or {})
        usage = _usage_from(rules, Windows.restore(saved_windows or {}, now), now)
        parked = {}
        source = "state (no proxy running)"
    # Staleness as of now (a stopped proxy's saved flags are as of when it stopped).
    health.sweep(now, lambda a: stale_after(rules, a))
    names = sorted(
        set(rules.agents)
        | set(health.agents)
        | {k.agent for k in rules.kills if not is_pattern(k.agent)}
    )
    agents = []
    for name in names:
        kill = rules.kill_for(name)
        seen = health.agents.get(name)
        agents.append(
            {
                "agent": name,
                "state": health.state(name, kill.mode if kill is not None else None),
                "configured": name in rules.agents,
                "last_seen": _iso(seen.last) if seen else None,
                "requests": seen.requests if seen else 0,
                "reason": kill.reason if kill else None,
                "by": kill.by if kill else None,
                "since": kill.at if kill else None,
                "kill_pattern": kill.agent if kill else None,
                "parked": int(parked.get(name, 0)),
                "limits": usage.get(name) or _zero(rules, name),
                "instances": [
                    {
                        "instance": inst,
                        "state": "stale" if s.stale else "active",
                        "last_seen": _iso(s.last),
                        "requests": s.requests,
                    }
                    for inst, s in sorted(health.instances.get(name, {}).items())
                ],
            }
        )
    proxy = None
    if enforced is not None:
        proxy = {
            "running": running,
            "pid": enforced.get("pid"),
            "listen": enforced.get("listen"),
            "revision": enforced.get("revision"),
            "in_sync": enforced.get("revision") == rules.kill_revision,
        }
    return {
        "source": source,
        "at": _iso(now),
        "proxy": proxy,
        "kill_revision": rules.kill_revision,
        "agents": agents,
    }


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _usage_from(rules: Ruleset, windows: Windows, now: float) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for name in windows.agents():
        agent = rules.agents.get(name)
        rows = usage_rows(windows, name, agent.limits if agent is not None else (), now)
        if rows:
            out[name] = rows
    return out


def _zero(rules: Ruleset, name: str) -> list[dict[str, Any]]:
    agent = rules.agents.get(name)
    return [
        {"key": lim.key, "used": 0, "max": lim.max, "per": lim.per, "on_exceed": lim.on_exceed}
        for lim in (agent.limits if agent is not None else ())
    ]


# ---------------------------------------------------------------- rendering


def ago(iso: str | None, now: float | None = None) -> str:
    """``2026-11-30T06:46:03.021Z`` → ``3m ago``; ``never`` for None."""
    if not iso:
        return "never"
    try:
        then = datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return iso
    secs = int((time.time() if now is None else now) - then)
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if secs >= size:
            return f"{secs // size}{unit} ago"
    return f"{max(secs, 0)}s ago"


def limit_text(u: dict[str, Any]) -> str:
    """``deploy 3/3 per 6h``, ``$0.04/$50 per 1d``."""
    key = str(u.get("key", "?")).removeprefix("actions.")
    per = format_duration(float(u.get("per", 0)))
    used, most = float(u.get("used", 0)), u.get("max")
    if key == "cost_usd":
        cap = f"/${float(most):g}" if most is not None else ""
        return f"${used:.2f}{cap} per {per}"
    most = float(most or 0)
    return f"{key} {used:g}/{most:g} per {per}"


STYLE = {
    "active": "green",
    "stale": "yellow",
    "killed": "bold red",
    "paused": "magenta",
    "never_seen": "dim",
}


def render(data: dict[str, Any]) -> Group:
    """A table readable at 80 columns: one row per agent, one indented row per instance."""
    table = Table(box=None, pad_edge=False, header_style="bold", expand=False)
    table.add_column("agent", no_wrap=True, max_width=18)
    table.add_column("state", no_wrap=True)
    table.add_column("seen", no_wrap=True)
    table.add_column("reqs", justify="right", no_wrap=True)
    table.add_column("limits", no_wrap=True)
    table.add_column("why", overflow="fold", ratio=1)
    for row in data["agents"]:
        why = ""
        if row["state"] in ("killed", "paused"):
            why = f"{row['reason'] or '(no reason)'} ({row['by']}, {ago(row['since'])})"
        if row["parked"]:
            why = f"{row['parked']} parked; {why}"
        state = row["state"].replace("never_seen", "never seen")
        table.add_row(
            row["agent"],
            Text(state, style=STYLE.get(row["state"], "")),
            ago(row["last_seen"]) if row["last_seen"] else "-",
            str(row["requests"]),
            "\n".join(limit_text(u) for u in row["limits"]) or "-",
            why,
        )
        for inst in row["instances"] if len(row["instances"]) > 1 else ():
            table.add_row(
                Text(f" └ {inst['instance']}", style="dim"),
                Text(inst["state"], style=STYLE.get(inst["state"], "")),
                ago(inst["last_seen"]),
                str(inst["requests"]),
                "",
                "",
            )
    proxy = data.get("proxy")
    if proxy is None:
        footer = "no proxy has run with this state directory"
    elif not proxy["running"]:
        footer = "proxy not running: showing the last saved state"
    elif not proxy["in_sync"]:
        footer = (
            f"proxy pid {proxy['pid']} enforces kill revision {proxy['revision']}, "
            f"the kill list is at {data['kill_revision']}"
        )
    else:
        footer = f"proxy pid {proxy['pid']} on {', '.join(proxy['listen'] or [])}"
    return Group(table, Text(footer, style="dim"))
