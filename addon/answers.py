"""mitmproxy face: what the proxy answers on its own: JSON refusals with a reason header."""

from __future__ import annotations

import json

from mitmproxy import http

from .audit import now_iso
from .ruleset import Kill

DECISION_HEADER = "X-Axme-Fw-Decision"


def refusal(
    status: int,
    reason: str,
    agent: str | None,
    detail: str = "",
    kill: Kill | None = None,
    extra_headers: dict[str, str] | None = None,
) -> http.Response:
    """The JSON refusal every client sees: ``{"error", "agent", "reason", "by", "at"}``."""
    body = {
        "error": reason,
        "agent": agent,
        "reason": kill.reason if kill is not None and not detail else detail,
        "by": kill.by if kill is not None else "axme-fw",
        "at": kill.at if kill is not None else now_iso(),
    }
    headers = {"Content-Type": "application/json", DECISION_HEADER: reason}
    if status == 407:
        headers["Proxy-Authenticate"] = 'Basic realm="axme-fw"'
    headers.update(extra_headers or {})
    return http.Response.make(status, json.dumps(body).encode() + b"\n", headers)
