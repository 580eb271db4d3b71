"""mitmproxy face: ``http://axme-fw.local``, answered by the proxy itself for agents.

``/heartbeat`` and ``/status``, authenticated by the same proxy credentials. An agent
reports in and reads its own status; there is no endpoint that changes anything
(resume, kill, limits are the operator's, on the admin listener).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from mitmproxy import http

from .answers import refusal
from .gate import Gate
from .policy import Facts, identify
from .store import Store


def answer(
    flow: http.HTTPFlow,
    facts: Facts,
    gate: Gate,
    store: Store,
    heartbeat: Callable[[str], str],
    parked: Callable[[], dict[str, int]],
) -> None:
    """Answer a request to the control host (its credentials already verified);
    ``heartbeat(agent)`` records it and returns the instance."""
    agent, _refused = identify(gate.rules, facts.user, facts.token)
    name = agent.name if agent is not None else (facts.user or "anonymous")
    path = flow.request.path.split("?", 1)[0].rstrip("/")
    if path not in ("/heartbeat", "/status"):
        flow.response = refusal(
            403,
            "control_forbidden",
            name,
            "agents can report in (/heartbeat) and read their status (/status); "
            "they cannot change anything",
        )
        return
    if flow.request.method not in ("GET", "POST", "HEAD"):
        flow.response = refusal(405, "control_forbidden", name, "use GET or POST")
        return
    instance = heartbeat(name)
    kill = gate.rules.kill_for(name)
    seen = store.seen(name)
    body = {
        "agent": name,
        "instance": instance,
        "state": store.health_state(name, kill.mode if kill is not None else None),
        "kill": {"reason": kill.reason, "by": kill.by, "at": kill.at, "mode": kill.mode}
        if kill is not None
        else None,
        "limits": gate.usage(time.time(), only=name).get(name, []),
        "requests": seen.requests if seen is not None else 0,
        "parked": parked().get(name, 0),
    }
    flow.response = http.Response.make(
        200, json.dumps(body).encode() + b"\n", {"Content-Type": "application/json"}
    )
