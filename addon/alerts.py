"""Webhook alerts, sent off the request path.

:meth:`Alerter.send` only puts the event on a bounded queue (never blocks, safe from
the event loop). One daemon thread POSTs JSON to every webhook subscribed to the
event, retrying with exponential backoff. Each event is delivered at most once per
webhook; a failure after the last try, or an event dropped because the queue is
full, is reported through ``on_failure`` (the proxy audits it). A dead or slow
webhook therefore delays no flow: at worst its events are late or dropped.

The body carries a Slack-compatible ``text`` field, so an incoming-webhook URL works
as is, plus the event's fields for machines.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from .rules import Alert

log = logging.getLogger(__name__)

QUEUE_SIZE = 1000
TRIES = 4
TIMEOUT = 3.0


def text_for(event: str, fields: dict[str, Any]) -> str:
    """One line a person can read in Slack."""
    agent = fields.get("agent", "?")
    reason = fields.get("reason") or fields.get("detail") or ""
    by = f" by {fields['by']}" if fields.get("by") else ""
    tail = f": {reason}" if reason else ""
    return f"axme-fw {event}: {agent}{by}{tail}"


class Alerter:
    def __init__(
        self,
        on_failure: Callable[[str, dict[str, Any]], None],
        backoff: float = 0.5,
    ) -> None:
        self.alerts: Sequence[Alert] = ()
        self._on_failure = on_failure
        self._backoff = backoff
        self._queue: queue.Queue[tuple[str, str, dict[str, Any]] | None] = queue.Queue(QUEUE_SIZE)
        self._thread = threading.Thread(target=self._run, name="axme-fw-alerts", daemon=True)
        self._thread.start()

    def send(self, event: str, **fields: Any) -> None:
        """Queue ``event`` for every webhook that asked for it. Never blocks."""
        body = {"event": event, "text": text_for(event, fields), **fields}
        for alert in self.alerts:
            if event in alert.events:
                try:
                    self._queue.put_nowait((alert.webhook, event, body))
                except queue.Full:
                    self._on_failure(
                        "alert.dropped",
                        {"event": event, "webhook": alert.webhook, "why": "queue full"},
                    )

    def close(self, timeout: float = 2.0) -> None:
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            return
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            url, event, body = item
            self._deliver(url, event, body)

    def _deliver(self, url: str, event: str, body: dict[str, Any]) -> None:
        data = json.dumps(body, default=str).encode()
        error = ""
        for attempt in range(TRIES):
            req = urllib.request.Request(
                url, data=data, method="POST", headers={"Content-Type": "application/json"}
            )
            try:
                # The proxy's own alerts must not go through a proxy from its environment.
                opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
                with opener.open(req, timeout=TIMEOUT) as resp:
                    if 200 <= resp.status < 300:
                        return
                    error = f"HTTP {resp.status}"
            except urllib.error.HTTPError as exc:
                error = f"HTTP {exc.code}"
            except (OSError, ValueError) as exc:
                error = str(exc)
            if attempt + 1 < TRIES:
                time.sleep(self._backoff * 2**attempt)
        log.warning("axme-fw: alert %s to %s failed: %s", event, url, error)
        self._on_failure(
            "alert.failed", {"event": event, "webhook": url, "error": error, "tries": TRIES}
        )
