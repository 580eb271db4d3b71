"""Control: Prometheus metrics (``GET /metrics`` on the admin listener), via prometheus-client.

Counters are bumped on the loop as things happen (requests and their outcome, audit
events: kills, resumes, cuts, reloads, rejections, throttles); gauges are read at scrape
time from what the proxy already holds (parked flows, spend and limit use, alert and
audit-writer counts). Label cardinality is bounded: agent labels are names from the
rules, every other caller is ``unknown``; reasons are the proxy's own stable strings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

UNKNOWN = "unknown"

# audit event → (counter, labels taken from the event's fields)
_KILL_EVENTS = {"agent.killed": "block", "agent.paused": "park", "agent.auto_killed": None}


class Metrics:
    def __init__(
        self,
        known: Callable[[str], bool],
        gauges: Callable[[], Mapping[str, Any]],
    ) -> None:
        """``known(name)``: whether an agent is in the rules (else labelled ``unknown``);
        ``gauges()``: ``{"parked": {agent: n}, "usage": {agent: rows}, "alerts_delivered",
        "alerts_failed", "audit_failures", "audit_dropped"}`` at scrape time."""
        self._known = known
        disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created series double the output and say little here
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "axme_fw_requests", "Requests decided, by agent, verdict and reason",
            ["agent", "verdict", "reason"], registry=r,
        )  # fmt: skip
        self.kills = Counter(
            "axme_fw_kills", "Kills and pauses applied, by mode and source", ["mode", "source"],
            registry=r,
        )  # fmt: skip
        self.resumes = Counter("axme_fw_resumes", "Resumes applied", registry=r)
        self.cuts = Counter(
            "axme_fw_inflight_cuts", "In-flight flows ended by a kill", ["agent"], registry=r
        )
        self.reloads = Counter("axme_fw_rules_reloads", "Rules reloads applied", registry=r)
        self.rejections = Counter(
            "axme_fw_rules_rejections", "Rules edits rejected (last good rules kept)", registry=r
        )
        self.auth_failures = Counter(
            "axme_fw_admin_auth_failures", "Failed admin API authentications", registry=r
        )
        self.latency = Histogram(
            "axme_fw_decision_seconds", "Time to decide a request (the gate, per request)",
            buckets=(5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 0.025),
            registry=r,
        )  # fmt: skip
        r.register(_Gauges(gauges, self.agent))

    def agent(self, name: str | None) -> str:
        return name if name is not None and self._known(name) else UNKNOWN

    def request(self, agent: str | None, verdict: str, reason: str, seconds: float) -> None:
        self.requests.labels(self.agent(agent), verdict, reason).inc()
        self.latency.observe(seconds)

    def event(self, event: str, fields: Mapping[str, Any]) -> None:
        """Count what an audit event says happened."""
        if event in _KILL_EVENTS:
            by = str(fields.get("by", ""))
            source = by.split(":", 1)[0] if ":" in by else "cli"
            mode = _KILL_EVENTS[event] or str(fields.get("mode", "block"))
            self.kills.labels(mode, source).inc()
        elif event == "agent.resumed":
            self.resumes.inc()
        elif event == "kill.enforced":
            self.cuts.labels(self.agent(fields.get("agent"))).inc(int(fields.get("flows_cut", 0)))
        elif event == "rules.reloaded":
            self.reloads.inc()
        elif event == "rules.rejected":
            self.rejections.inc()
        elif event == "admin.auth_failed":
            self.auth_failures.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Gauges(Collector):
    def __init__(self, read: Callable[[], Mapping[str, Any]], label: Callable[[str], str]):
        self._read, self._label = read, label

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = self._read()
        parked = GaugeMetricFamily("axme_fw_parked_flows", "Flows parked now", labels=["agent"])
        for agent, n in sorted(g.get("parked", {}).items()):
            parked.add_metric([self._label(agent)], n)
        yield parked
        spend = GaugeMetricFamily(
            "axme_fw_spend_usd", "Spend in USD in the cost window", labels=["agent"]
        )
        use = GaugeMetricFamily(
            "axme_fw_limit_used", "Use of each limit in its window", labels=["agent", "limit"]
        )
        ceiling = GaugeMetricFamily(
            "axme_fw_limit_max", "Each limit's maximum", labels=["agent", "limit"]
        )
        for agent, rows in sorted(g.get("usage", {}).items()):
            name = self._label(agent)
            for row in rows:
                if row["key"] == "cost_usd":
                    spend.add_metric([name], float(row["used"]))
                use.add_metric([name, row["key"]], float(row["used"]))
                if row.get("max") is not None:
                    ceiling.add_metric([name, row["key"]], float(row["max"]))
        yield from (spend, use, ceiling)
        for key, help_text in (
            ("alerts_delivered", "Alert webhooks delivered"),
            ("alerts_failed", "Alert webhooks that failed after retries"),
            ("audit_failures", "Failed audit log appends (retried)"),
            ("audit_dropped", "Audit records dropped after retries"),
        ):
            yield GaugeMetricFamily(f"axme_fw_{key}", help_text, value=float(g.get(key, 0)))
