"""mitmproxy face: per-connection bookkeeping, and cutting an agent's work in progress.

Which client connection belongs to which agent, what each one has in flight, the
credentials and target of the CONNECT a connection tunnels, and which tunnels pass
through unseen. Only the addon's hooks change it; :meth:`Connections.cut` reads it.
"""

from __future__ import annotations

import re
from typing import Any

from mitmproxy import ctx, http

from .answers import refusal
from .canonical import Request
from .inflight import cut_clients
from .policy import Decision
from .ruleset import Kill

_AUTH = b"proxy-authorization"
_INSTANCE = b"x-agent-instance"


def take_headers(req: http.Request) -> tuple[str | None, str | None, bool]:
    """Remove Proxy-Authorization and X-Agent-Instance in one pass: (auth, instance,
    whether there were two credentials; which one a hop reads would be a guess).

    Neither may leave the proxy. One pass over the raw fields instead of two
    ``headers.pop`` calls: this runs on every request.
    """
    auth = instance = None
    two = False
    keep = []
    for name, value in req.headers.fields:
        low = name.lower()
        if low == _AUTH:
            two = auth is not None
            auth = value.decode("latin-1")
        elif low == _INSTANCE:
            instance = value.decode("latin-1")
        else:
            keep.append((name, value))
    if auth is not None or instance is not None:
        req.headers.fields = tuple(keep)
    return auth, instance, two


def active(flow: http.HTTPFlow) -> bool:
    """Whether a flow is still in progress (no answer yet, streaming, or a live websocket)."""
    if flow.error is not None:
        return False
    if flow.websocket is not None:
        return flow.websocket.timestamp_end is None
    return flow.response is None or flow.response.timestamp_end is None


def passes_through(host: str, port: int) -> bool:
    """Whether mitmproxy will tunnel this CONNECT without intercepting it (err towards yes)."""
    opts, addr = ctx.options, f"{host}:{port}"
    if opts.allow_hosts and not any(re.search(x, addr, re.IGNORECASE) for x in opts.allow_hosts):
        return True
    return any(re.search(x, addr, re.IGNORECASE) for x in (*opts.ignore_hosts, *opts.tcp_hosts))


def decision_record(flow: http.HTTPFlow, d: Decision, would: bool) -> dict[str, Any]:
    """The audit record of a decision on ``flow`` (as forwarded: canonical, no credentials)."""
    req = flow.request
    peer = flow.client_conn.peername
    return {
        "agent": d.agent,
        "instance": peer[0] if peer else None,
        "verdict": ("would_" + d.verdict.value) if would else d.verdict.value,
        "reason": d.reason,
        "detail": d.detail,
        "method": req.method,
        "host": req.host,
        "path": req.path.split("?", 1)[0] if req.method != "CONNECT" else "",
    }


class Connections:
    def __init__(self) -> None:
        # Credentials remembered per client connection after a CONNECT (requests inside
        # the tunnel carry none of their own).
        self.tunnel_auth: dict[str, tuple[str, str]] = {}
        self.tunnel_target: dict[str, tuple[str, int]] = {}  # client id → CONNECT host, port
        self.agent_of: dict[str, str] = {}  # client connection id → agent
        self.live: dict[str, set[str]] = {}  # agent → client ids with work in progress
        self.inflight: dict[str, set[http.HTTPFlow]] = {}  # client id → flows in progress
        self.passthrough: set[str] = set()  # CONNECT tunnels with no request seen inside (yet)

    def track(self, cid: str, agent: str) -> None:
        if self.agent_of.get(cid) != agent:
            self.agent_of[cid] = agent
            self.live.setdefault(agent, set()).add(cid)

    def started(self, cid: str, flow: http.HTTPFlow) -> None:
        """A request of a tracked connection goes upstream."""
        flows = self.inflight.get(cid)
        if flows is None:
            self.inflight[cid] = {flow}
        else:  # requests on one connection are mostly sequential: drop what has finished
            flows.intersection_update([f for f in flows if active(f)])
            flows.add(flow)

    def forget(self, cid: str) -> None:
        self.tunnel_auth.pop(cid, None)
        self.tunnel_target.pop(cid, None)
        self.inflight.pop(cid, None)
        self.passthrough.discard(cid)
        agent = self.agent_of.pop(cid, None)
        if agent is not None:
            conns = self.live.get(agent)
            if conns is not None:
                conns.discard(cid)
                if not conns:
                    del self.live[agent]

    def cut(self, agent: str, kill: Kill) -> tuple[int, int]:
        """End every client connection of ``agent`` with work in progress.

        Returns (connections cut, flows ended: requests, streams, websockets, tunnels).
        A request still waiting for its response is first answered with the JSON 403.
        Idle keep-alive connections stay open: their next request is refused with 403.
        """
        flows = 0
        targets = set()
        for cid in self.live.get(agent, ()):
            n = sum(1 for f in self.inflight.get(cid, ()) if active(f))
            if n or cid in self.passthrough:
                targets.add(cid)
                flows += n or 1  # a passed-through tunnel is one flow
        if not targets:
            return 0, 0

        def answer(cid: str) -> tuple[http.HTTPFlow, http.Response] | None:
            waiting = [
                f for f in self.inflight.get(cid, ()) if f.response is None and f.error is None
            ]
            if len(waiting) != 1 or waiting[0].websocket is not None:
                return None
            headers = {"Connection": "close"}
            return waiting[0], refusal(403, "agent_killed", agent, kill.reason, kill, headers)

        return cut_clients(targets, answer), flows

    def request(self, flow: http.HTTPFlow, auth: str | None, two: bool) -> Request:
        """The gate's view of ``flow`` (its credentials already taken off)."""
        req, cid = flow.request, flow.client_conn.id
        connect = req.method == "CONNECT"
        fields = req.headers.fields
        return Request(
            auth,
            two,
            self.tunnel_auth.get(cid),
            # mitmproxy upper-cases .method but sends the bytes as they came: check those.
            req.data.method.decode("utf-8", "replace"),
            req.host,
            req.port,
            "" if connect else req.path,
            connect,
            req.scheme,
            req.authority,
            tuple(req.headers.get_all("host")),
            flow.client_conn.sni,
            self.tunnel_target.get(cid),
            sum(len(k) + len(v) + 4 for k, v in fields),
            len(req.headers.get_all("content-length")),
            "transfer-encoding" in req.headers,
        )
