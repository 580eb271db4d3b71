"""Pure core: health from traffic: every flow is a heartbeat for its agent and instance.

Pure: no I/O, no clock (every call takes ``now``). The proxy records each flow with
:meth:`Health.saw` (a dictionary update on the hot path), and sweeps for staleness a
few times a second with :meth:`Health.sweep`.

States: ``active`` (seen within ``stale_after``), ``stale`` (not seen for longer),
``never_seen``, and — from the kill list, which wins — ``killed`` and ``paused``.
An agent goes stale once and is reported once (``agent.stale``) until traffic comes
back (``agent.recovered``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .ruleset import Ruleset

STATES = ("active", "stale", "killed", "paused", "never_seen")


def stale_after(rules: Ruleset, agent: str) -> float:
    """The agent's ``heartbeat.stale_after``, else the default."""
    a = rules.agents.get(agent)
    return (a.stale_after if a is not None and a.stale_after else 0) or rules.defaults.stale_after


@dataclass(slots=True)
class Seen:
    last: float
    requests: int = 0
    stale: bool = False


class Health:
    def __init__(self) -> None:
        self.agents: dict[str, Seen] = {}
        self.instances: dict[str, dict[str, Seen]] = {}  # agent -> instance -> seen

    def saw(self, agent: str, instance: str, now: float) -> bool:
        """Record a flow; True when this brings a stale agent back (alert ``agent.recovered``)."""
        seen = self.agents.get(agent)
        if seen is None:
            seen = self.agents[agent] = Seen(now)
        recovered = seen.stale
        seen.last, seen.stale = now, False
        seen.requests += 1
        per = self.instances.setdefault(agent, {})
        inst = per.get(instance)
        if inst is None:
            inst = per[instance] = Seen(now)
        inst.last, inst.stale = now, False
        inst.requests += 1
        return recovered

    def sweep(self, now: float, stale_after: Callable[[str], float]) -> list[str]:
        """Mark agents (and instances) not seen for ``stale_after(agent)``; return the agents
        that just went stale, each once until it recovers."""
        newly = []
        for agent, seen in self.agents.items():
            limit = now - stale_after(agent)
            if not seen.stale and seen.last <= limit:
                seen.stale = True
                newly.append(agent)
            for inst in self.instances.get(agent, {}).values():
                inst.stale = inst.last <= limit
        return newly

    def reset(self, agent: str, now: float) -> None:
        """After a resume: seen now, not stale (the clock of staleness starts again)."""
        seen = self.agents.get(agent)
        if seen is not None:
            seen.last, seen.stale = now, False

    def state(self, agent: str, kill_mode: str | None) -> str:
        if kill_mode is not None:
            return "paused" if kill_mode == "park" else "killed"
        seen = self.agents.get(agent)
        if seen is None:
            return "never_seen"
        return "stale" if seen.stale else "active"

    def snapshot(self) -> dict[str, Any]:
        return {
            "agents": {a: [s.last, s.requests, s.stale] for a, s in self.agents.items()},
            "instances": {
                a: {i: [s.last, s.requests, s.stale] for i, s in per.items()}
                for a, per in self.instances.items()
            },
        }

    @classmethod
    def restore(cls, data: Mapping[str, Any]) -> Health:
        """Rebuild from :meth:`snapshot`; malformed entries are skipped."""
        health = cls()
        for agent, row in _rows(data.get("agents")):
            health.agents[agent] = row
        inst = data.get("instances")
        if isinstance(inst, Mapping):
            for agent, per in inst.items():
                rows = dict(_rows(per))
                if isinstance(agent, str) and rows:
                    health.instances[agent] = rows
        return health


def _rows(data: object) -> list[tuple[str, Seen]]:
    out = []
    if isinstance(data, Mapping):
        for key, row in data.items():
            if (
                isinstance(key, str)
                and isinstance(row, list)
                and len(row) == 3
                and isinstance(row[0], int | float)
                and isinstance(row[1], int)
            ):
                out.append((key, Seen(float(row[0]), row[1], bool(row[2]))))
    return out


def merge(snapshots: list[Mapping[str, Any]]) -> Health:
    """Replicas' health as one: last seen is the latest, requests add up, an agent is
    stale only where every replica that saw it says so; instances are the union."""
    out = Health()
    for snap in snapshots:
        part = Health.restore(snap)
        for agent, seen in part.agents.items():
            have = out.agents.get(agent)
            if have is None:
                out.agents[agent] = Seen(seen.last, seen.requests, seen.stale)
            else:
                have.last, have.requests = max(have.last, seen.last), have.requests + seen.requests
                have.stale = have.stale and seen.stale
        for agent, per in part.instances.items():
            mine = out.instances.setdefault(agent, {})
            for inst, seen in per.items():
                if inst not in mine or mine[inst].last < seen.last:
                    mine[inst] = seen
    return out
