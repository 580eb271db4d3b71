"""Control: webhook alerts, sent off the request path.

:meth:`Alerter.send` only puts the event on a bounded queue (never blocks, safe from
the event loop). One daemon thread POSTs JSON to every webhook subscribed to the
event, retrying with exponential backoff. Each event is delivered at most once per
webhook; a failure after the last try, or an event dropped because the queue is
full, is reported through ``on_failure`` (the proxy audits it). A dead or slow
webhook therefore delays no flow: at worst its events are late or dropped.

Each webhook has its own delivery thread: a dead one delays only its own events.
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
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from .ruleset import Alert

log = logging.getLogger(__name__)

QUEUE_SIZE = 1000
TRIES = 4
TIMEOUT = 3.0


def redact(url: str) -> str:
    """``scheme://host:port/…``: webhook paths often carry secrets (Slack's do)."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}/…"


def text_for(event: str, fields: dict[str, Any]) -> str:
    """One line a person can read in Slack."""
    agent = fields.get("agent") or (f"replica {fields['replica']}" if "replica" in fields else "?")
    reason = fields.get("reason") or fields.get("detail") or ""
    by = f" by {fields['by']}" if fields.get("by") else ""
    tail = f": {reason}" if reason else ""
    return f"axme-fw {event}: {agent}{by}{tail}"


class Alerter:
    """One delivery thread and bounded queue per webhook, so a dead webhook holds up only
    its own events, never another webhook's."""

    def __init__(
        self,
        on_failure: Callable[[str, dict[str, Any]], None],
        backoff: float = 0.5,
    ) -> None:
        self.alerts: Sequence[Alert] = ()
        self._on_failure = on_failure
        self._backoff = backoff
        self._workers: dict[str, _Worker] = {}

    def counts(self) -> tuple[int, int]:
        """(delivered, failed) webhook calls so far."""
        ws = list(self._workers.values())
        return sum(w.delivered for w in ws), sum(w.failed for w in ws)

    def send(self, event: str, **fields: Any) -> None:
        """Queue ``event`` for every webhook that asked for it. Never blocks."""
        body = {"event": event, "text": text_for(event, fields), **fields}
        for alert in self.alerts:
            if event not in alert.events:
                continue
            worker = self._workers.get(alert.webhook)
            if worker is None:
                worker = self._workers[alert.webhook] = _Worker(
                    alert.webhook, self._on_failure, self._backoff
                )
            try:
                worker.queue.put_nowait((event, body))
            except queue.Full:
                self._on_failure(
                    "alert.dropped",
                    {"alert": event, "webhook": redact(alert.webhook), "why": "queue full"},
                )

    def close(self, timeout: float = 2.0) -> None:
        deadline = time.monotonic() + timeout
        for worker in self._workers.values():
            worker.stop(max(0.0, deadline - time.monotonic()))


class _Worker:
    def __init__(
        self, url: str, on_failure: Callable[[str, dict[str, Any]], None], backoff: float
    ) -> None:
        self.url = url
        self.queue: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue(QUEUE_SIZE)
        self._on_failure = on_failure
        self._backoff = backoff
        self.delivered = self.failed = 0  # written by this worker's thread only
        self._thread = threading.Thread(
            target=self._run, name=f"axme-fw-alert-{redact(url)}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float) -> None:
        try:
            self.queue.put_nowait(None)
        except queue.Full:
            return
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            self._deliver(*item)

    def _deliver(self, event: str, body: dict[str, Any]) -> None:
        url = self.url
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
                        self.delivered += 1
                        return
                    error = f"HTTP {resp.status}"
            except urllib.error.HTTPError as exc:
                error = f"HTTP {exc.code}"
            except (OSError, ValueError) as exc:
                error = str(exc)
            if attempt + 1 < TRIES:
                time.sleep(self._backoff * 2**attempt)
        self.failed += 1
        log.warning("axme-fw: alert %s to %s failed: %s", event, redact(url), error)
        self._on_failure(
            "alert.failed",
            {
                "alert": event,
                "webhook": redact(url),
                "error": error.replace(url, redact(url)),
                "tries": TRIES,
                "agent": body.get("agent"),
            },
        )
