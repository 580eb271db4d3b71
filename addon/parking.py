"""mitmproxy face: parking: hold flows (intercept) until resume, kill, timeout or shutdown.

Rules the e2e tests hold us to:

- Released in arrival order. Resuming all at once lets each flow race on its own new
  upstream connection (measured: most arrive out of place), so flows go one at a time:
  the next is resumed once the previous one's upstream connection is up (its request
  bytes follow at once on the same task), or at once if it reuses an open connection.
  A flow that never gets that far holds the line for at most ``RELEASE_STEP_TIMEOUT``.
- Bounded: past ``max_per_agent`` a new flow is answered 503 ``park_full``.
- A parked flow is answered 503 ``park_timeout`` after ``timeout``.
- A client that disconnects while parked is forgotten at once: it never reaches upstream.
- mitmproxy does not answer intercepted flows at shutdown: :meth:`ParkingLot.answer_all`.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from mitmproxy import http

from .answers import refusal
from .ruleset import Kill

RELEASE_STEP_TIMEOUT = 1.0
PARKED_AT = "axme_fw.parked_at"


class ParkingLot:
    def __init__(
        self,
        audit: Callable[..., None],
        changed: Callable[[], None],
        limits: Callable[[], tuple[float, int]],
    ) -> None:
        """``changed()`` is called when counts change; ``limits()`` gives (timeout, max)."""
        self._audit = audit
        self._changed = changed
        self._limits = limits
        self.loop: asyncio.AbstractEventLoop | None = None
        self.parked: dict[str, deque[http.HTTPFlow]] = {}  # agent → held flows, in order
        self.releasing: dict[str, deque[http.HTTPFlow]] = {}  # agent → being released
        self.awaiting: dict[str, str] = {}  # client id of the flow being released → agent
        self._timer: asyncio.TimerHandle | None = None

    def counts(self) -> dict[str, int]:
        return {a: len(q) for a, q in self.parked.items() if q}

    def agents(self) -> set[str]:
        return {*self.parked, *self.releasing}

    def client_ids(self) -> set[str]:
        held = (*self.parked.values(), *self.releasing.values())
        return {f.client_conn.id for q in held for f in q}

    def park(self, flow: http.HTTPFlow, agent: str) -> None:
        queue = self.parked.setdefault(agent, deque())
        _timeout, most = self._limits()
        if len(queue) >= most:
            flow.response = refusal(503, "park_full", agent, "too many parked requests")
            return
        flow.metadata[PARKED_AT] = time.monotonic()
        flow.intercept()
        queue.append(flow)
        self._schedule()
        self._changed()

    def release(self, agent: str) -> None:
        """Release ``agent``'s parked flows upstream, in arrival order (see module doc)."""
        queue = self.parked.pop(agent, deque())
        if not queue:
            return
        self._audit("park.released", agent=agent, flows=len(queue))
        self._changed()
        self.releasing.setdefault(agent, deque()).extend(queue)
        if agent not in self.awaiting.values():
            self._release_next(agent)

    def _release_next(self, agent: str) -> None:
        queue = self.releasing.get(agent)
        while queue:
            flow = queue.popleft()
            flow.resume()
            conn = flow.server_conn
            if flow.request.method == "CONNECT" or flow.response is not None or conn.connected:
                continue  # nothing to connect: its bytes go out in this loop iteration
            cid = flow.client_conn.id
            self.awaiting[cid] = agent
            assert self.loop is not None
            self.loop.call_later(RELEASE_STEP_TIMEOUT, self.step_done, cid, agent)
            return
        self.releasing.pop(agent, None)

    def step_done(self, cid: str, agent: str | None = None) -> None:
        """The flow being released on ``cid`` reached upstream (or failed, or timed out)."""
        owner = self.awaiting.pop(cid, None)
        if owner is not None and (agent is None or owner == agent):
            assert self.loop is not None
            self.loop.call_soon(self._release_next, owner)
        elif owner is not None:  # a stale timer for an earlier step: put it back
            self.awaiting[cid] = owner

    def answer(
        self, agent: str, status: int, reason: str, detail: str, kill: Kill | None = None
    ) -> None:
        """Answer every held flow of ``agent`` (and any still being released) and let go."""
        queue = self.parked.pop(agent, deque())
        queue.extend(self.releasing.pop(agent, deque()))
        self._changed()
        for flow in queue:
            flow.response = refusal(status, reason, agent, detail, kill, {"Connection": "close"})
            flow.resume()
        if queue:
            self._audit(
                "park.answered", agent=agent, flows=len(queue), status=status, reason=reason
            )

    def answer_all(self, status: int, reason: str, detail: str) -> set[str]:
        """Answer everything held; returns the client ids answered (to wait for at shutdown)."""
        ids = self.client_ids()
        for agent in self.agents():
            self.answer(agent, status, reason, detail)
        return ids

    def forget(self, cid: str) -> None:
        """The client on ``cid`` went away: drop its held flows, never to be sent."""
        for queues in (self.parked, self.releasing):
            for queue in queues.values():
                for flow in [f for f in queue if f.client_conn.id == cid]:
                    queue.remove(flow)
                    flow.resume()
                    flow.kill()
                    self._changed()
        if cid in self.awaiting:
            self.step_done(cid)

    def _schedule(self) -> None:
        if self._timer is None and self.loop is not None:
            self._timer = self.loop.call_later(0.25, self._expire)

    def _expire(self) -> None:
        self._timer = None
        timeout, _most = self._limits()
        limit = time.monotonic() - timeout
        for agent, queue in list(self.parked.items()):
            while queue and queue[0].metadata.get(PARKED_AT, 0) <= limit:
                flow = queue.popleft()
                flow.response = refusal(503, "park_timeout", agent, "parked too long")
                flow.resume()
                self._changed()
            if not queue:
                del self.parked[agent]
        if self.parked:
            self._schedule()
