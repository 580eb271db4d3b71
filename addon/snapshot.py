"""State: what the running proxy enforces, published for the CLI.

When a rules file on disk is broken, the proxy keeps its last good rules; on-call
still needs ``axme-fw status`` and ``axme-fw env`` then. The proxy writes the parts of
its ruleset those commands read to ``state/rules.enforced.json`` whenever its agents,
actions or defaults change (off the loop; never a token hash), and its kill list to
``state/enforced.json`` on every swap. :func:`enforced_rules` rebuilds a
:class:`Ruleset` from them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .killswitch import read_enforced
from .ruleset import Agent, Defaults, Kill, Limit, Ruleset, make_action
from .state import read_json

RULES_FILE = "rules.enforced.json"


def rules_json(rules: Ruleset) -> dict[str, Any]:
    """Agents (limits, heartbeat), actions (hosts, methods, paths) and the defaults."""
    d = rules.defaults
    return {
        "rules": rules.digest,
        "defaults": {
            "unknown_agents": d.unknown_agents,
            "mode": d.mode,
            "stale_after": d.stale_after,
        },
        "actions": {
            name: {
                "hosts": list(a.hosts),
                "methods": sorted(a.methods) if a.methods is not None else None,
                "paths": list(a.paths),
            }
            for name, a in rules.actions.items()
        },
        "agents": {
            name: {
                "allow": list(a.allow),
                "addresses": list(a.addresses),
                "stale_after": a.stale_after,
                "where": a.where,
                "limits": [
                    {
                        "key": lim.key,
                        "max": lim.max,
                        "per": lim.per,
                        "on_exceed": lim.on_exceed,
                        "warn_at": lim.warn_at,
                    }
                    for lim in a.limits
                ],
            }
            for name, a in rules.agents.items()
        },
    }


def kills_json(rules: Ruleset) -> list[dict[str, str]]:
    return [
        {"agent": k.agent, "mode": k.mode, "reason": k.reason, "by": k.by, "at": k.at}
        for k in rules.kills
    ]


def enforced_rules(state_dir: Path) -> Ruleset | None:
    """The ruleset the proxy last published (token hashes blank), or None."""
    data = read_json(state_dir / RULES_FILE)
    ack = read_enforced(state_dir)
    if data is None or ack is None:
        return None
    try:
        d = data["defaults"]
        actions = {
            n: make_action(n, a["hosts"], a["methods"], a["paths"])
            for n, a in data["actions"].items()
        }
        agents = {
            n: Agent(
                n,
                "",
                tuple(a["allow"]),
                tuple(a["addresses"]),
                tuple(Limit(**lim) for lim in a["limits"]),
                float(a["stale_after"]),
                str(a["where"]),
            )
            for n, a in data["agents"].items()
        }
        kills = tuple(Kill(**k) for k in ack.get("kills") or [])
        defaults = Defaults(
            unknown_agents=d["unknown_agents"], mode=d["mode"], stale_after=d["stale_after"]
        )
        return Ruleset(
            defaults, actions, agents, kills, (), int(ack["revision"]), str(ack["rules"])
        )
    except (KeyError, TypeError, ValueError):
        return None
