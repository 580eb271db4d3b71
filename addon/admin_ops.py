"""Control: what the admin API does, on the proxy's loop: kill, resume, status, audit, metrics.

A kill or resume is the same write as the CLI's (``rules/kill.yaml`` under its lock,
off the loop), audited with the operator (``by: api:NAME``) and the caller's address.
Then the proxy reads the kill list at once (the fast path, not waiting for the file
watcher) and the call returns when the new revision is enforced: 200 with the time it
took, or 202 when that is not confirmed within :data:`CONFIRM_WITHIN` seconds.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import audit as audit_mod
from . import killswitch, snapshot
from .metrics import Metrics
from .rules import KILL_FILE
from .ruleset import Kill, Operator, Ruleset, is_pattern

Shared = tuple[int, list[str], list[str], float]  # revision, replicas, behind, ms

if TYPE_CHECKING:
    from .firewall import Firewall

log = logging.getLogger(__name__)

CONFIRM_WITHIN = 2.0


@dataclass
class Operations:
    rules: Callable[[], Ruleset]
    rules_dir: Callable[[], Path]
    state_dir: Path
    reload: Callable[[frozenset[str]], None]
    addresses: Callable[[], tuple[list[str], str | None]]
    audit: Callable[..., None]
    metrics_registry: Metrics
    metrics_public: bool = False
    extra_operators: Mapping[str, Operator] = field(default_factory=dict)
    # Replicas share the kill list: (agent, kill or None for a resume, wait s) → revision,
    # replicas, those behind, ms (RedisStore.change).
    shared: Callable[[str, Kill | None, float], Awaitable[Shared]] | None = None
    # Replicas share Redis: the fleet as it holds it (blocking; run in a worker thread).
    fleet: Callable[[], dict[str, Any]] | None = None

    def operators(self) -> Mapping[str, Operator]:
        ops = self.rules().operators
        return {**self.extra_operators, **ops} if self.extra_operators else ops

    def kills(self) -> dict[str, Any]:
        rules = self.rules()
        return {"revision": rules.kill_revision, "kills": snapshot.kills_json(rules)}

    async def kill(
        self, agent: str, mode: str, reason: str, by: str, address: str
    ) -> tuple[int, dict[str, Any]]:
        if self.shared is not None:
            kill = Kill(agent, mode, reason, by, audit_mod.now_iso())  # type: ignore[arg-type]
            return await self._shared(agent, kill, reason, by, address)
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        try:
            change = await loop.run_in_executor(
                None, killswitch.kill, self.rules_dir(), agent, mode, reason, by
            )
        except killswitch.KillFileError as exc:
            return 409, {"error": "kill_list_invalid", "detail": str(exc)}
        except OSError as exc:
            return 500, {"error": "kill_list_unwritable", "detail": str(exc)}
        event = "agent.paused" if mode == "park" else "agent.killed"
        log.info(
            "axme-fw: %s %s by %s from %s (revision %d)", event, agent, by, address, change.revision
        )
        self.audit(
            event, agent=agent, mode=mode, reason=reason, by=by, address=address,
            revision=change.revision,
        )  # fmt: skip
        warnings = []
        if not is_pattern(agent) and agent not in self.rules().agents:
            warnings.append(f"no agent {agent!r} in the rules")
        verb = "paused" if mode == "park" else "killed"
        return await self._confirmed(change.revision, started, verb, agent, mode, warnings)

    async def resume(
        self, agent: str, reason: str, by: str, address: str
    ) -> tuple[int, dict[str, Any]]:
        if self.shared is not None:
            return await self._shared(agent, None, reason, by, address)
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        try:
            change = await loop.run_in_executor(None, killswitch.resume, self.rules_dir(), agent)
        except killswitch.KillFileError as exc:
            return 409, {"error": "kill_list_invalid", "detail": str(exc)}
        except OSError as exc:
            return 500, {"error": "kill_list_unwritable", "detail": str(exc)}
        log.info("axme-fw: agent.resumed %s by %s from %s", agent, by, address)
        self.audit(
            "agent.resumed", agent=agent, reason=reason, by=by, address=address,
            revision=change.revision,
        )  # fmt: skip
        warnings = []
        if not change.removed:
            warnings.append(f"{agent!r} was not in the kill list")
        still = killswitch.covering(change.entries, agent)
        if still:
            warnings.append(f"{agent} is still covered by kill {', '.join(still)}")
        return await self._confirmed(change.revision, started, "resumed", agent, None, warnings)

    async def _shared(
        self, agent: str, kill: Kill | None, reason: str, by: str, address: str
    ) -> tuple[int, dict[str, Any]]:
        """The kill list in Redis: returns once every live replica acknowledged (200), or
        202 naming the replicas that did not within CONFIRM_WITHIN."""
        import redis

        assert self.shared is not None
        try:
            revision, live, behind, ms = await self.shared(agent, kill, CONFIRM_WITHIN)
        except (redis.RedisError, OSError, TimeoutError) as exc:
            return 503, {"error": "store_unavailable", "detail": f"Redis: {exc}"}
        verb = "resumed" if kill is None else ("paused" if kill.mode == "park" else "killed")
        event = {"resumed": "agent.resumed", "paused": "agent.paused"}.get(verb, "agent.killed")
        log.info(
            "axme-fw: %s %s by %s from %s (shared revision %d)", event, agent, by, address, revision
        )
        self.audit(
            event, agent=agent, reason=reason, by=by, address=address, redis_revision=revision
        )
        body: dict[str, Any] = {
            "agent": agent,
            "mode": kill.mode if kill is not None else None,
            "action": verb,
            "revision": revision,
            "warnings": [],
            "replicas": live,
        }
        if behind or not live:
            body["error"] = "not_confirmed"
            body["detail"] = (
                f"written to the shared kill list (revision {revision}); not acknowledged "
                f"within {CONFIRM_WITHIN:g} s by {', '.join(behind) or 'any replica'}"
            )
            body["behind"] = behind
            return 202, body
        body["enforced_ms"] = round(ms, 2)
        body["enforced_by"] = [f"{len(live)}/{len(live)} replicas"]
        return 200, body

    async def _confirmed(
        self,
        revision: int,
        started: float,
        verb: str,
        agent: str,
        mode: str | None,
        warnings: list[str],
    ) -> tuple[int, dict[str, Any]]:
        self.reload(frozenset({KILL_FILE}))  # read it now (the watcher would too, later)
        deadline = started + CONFIRM_WITHIN
        while self.rules().kill_revision < revision and time.monotonic() < deadline:
            await asyncio.sleep(0.002)
        body: dict[str, Any] = {
            "agent": agent,
            "mode": mode,
            "action": verb,
            "revision": revision,
            "warnings": warnings,
        }
        if self.rules().kill_revision < revision:
            body["error"] = "not_confirmed"
            body["detail"] = (
                f"written to the kill list (revision {revision}); the proxy did not confirm "
                f"it within {CONFIRM_WITHIN:g} s"
            )
            return 202, body
        listen, _admin = self.addresses()
        body["enforced_ms"] = round((time.monotonic() - started) * 1000, 2)
        body["enforced_by"] = listen
        return 200, body

    async def status(self) -> dict[str, Any]:
        """This proxy's status document; with replicas, also ``fleet``: every replica and
        every agent as Redis holds them (``{"error": ...}`` when Redis cannot answer)."""
        from .status import gather

        rules, loop = self.rules(), asyncio.get_running_loop()
        data = await loop.run_in_executor(None, gather, rules, self.state_dir)
        if self.fleet is not None:
            import redis

            try:
                data["fleet"] = await loop.run_in_executor(None, self.fleet)
            except (redis.RedisError, OSError) as exc:
                data["fleet"] = {"error": "store_unavailable", "detail": f"Redis: {exc}"}
        return data

    async def records(
        self, agent: str | None, since: str | None, everything: bool
    ) -> list[Mapping[str, Any]]:
        """Raises ValueError for a bad ``since``."""
        start = audit_mod.since_iso(since)
        path = self.state_dir / audit_mod.AUDIT_FILE

        def read() -> list[Mapping[str, Any]]:
            return [
                r
                for r in audit_mod.select(path, agent, start)
                if everything or r.get("event") not in audit_mod.NOISY
            ]

        return await asyncio.get_running_loop().run_in_executor(None, read)

    async def verify(self) -> dict[str, Any]:
        path = self.state_dir / audit_mod.AUDIT_FILE
        result = await asyncio.get_running_loop().run_in_executor(None, audit_mod.verify, path)
        return {
            "ok": result.ok,
            "records": result.lines,
            "problem": result.problem,
            "file": str(path),
        }

    def metrics(self) -> bytes:
        return self.metrics_registry.render()


def start(fw: Firewall) -> None:
    """Serve the admin API for ``fw`` (at ``running``); shut down when it cannot bind."""
    from mitmproxy import ctx  # the addon's wiring: mitmproxy is running

    from . import admin

    if fw.admin_listen is None or fw.state_dir is None:
        return
    o, loader = ctx.options, fw.loader
    assert loader is not None
    ops = Operations(
        lambda: fw.rules,
        lambda: loader.directory,
        fw.state_dir,
        fw.reload,
        fw._addresses,
        fw._audit,
        fw.metrics,
        bool(o.axme_metrics_public),
        env_operator(os.environ),
        getattr(fw.store, "change", None),  # a RedisStore: the shared kill list
        getattr(fw.store, "fleet_view", None),  # and the fleet it holds
    )
    fw.admin = admin.serve(
        fw.admin_listen,
        fw.state_dir,
        rules_loaded=lambda: fw.loader is not None and fw.store.ready(),
        audit_failing=lambda: fw.audit is not None and fw.audit.failing,
        cert=o.axme_admin_cert,
        key=o.axme_admin_key,
        backend=ops,
    )
    if fw.admin is None:
        ctx.master.shutdown()  # logged as an ERROR: mitmdump exits 1
    else:
        fw.gate.admin_targets = admin.admin_targets(fw.admin_listen, fw.admin.port)


def gauges(fw: Firewall) -> dict[str, Any]:
    """What the metrics' gauges read at scrape time."""
    delivered, failed = fw.alerter.counts() if fw.alerter is not None else (0, 0)
    writer = fw.audit
    return {
        "parked": fw.lot.counts(),
        "usage": fw.gate.usage(time.time()) if "gate" in fw.__dict__ else {},
        "alerts_delivered": delivered,
        "alerts_failed": failed,
        "audit_failures": writer.failures if writer is not None else 0,
        "audit_dropped": writer.dropped if writer is not None else 0,
    }


def env_operator(env: Mapping[str, str]) -> dict[str, Operator]:
    """``AXME_FW_ADMIN_TOKEN`` in the proxy's environment (a container Secret) defines the
    operator ``admin``; only its hash is kept. Rules may define ``admin`` instead."""
    token = env.get("AXME_FW_ADMIN_TOKEN", "").strip()
    if not token:
        return {}
    digest = hashlib.sha256(token.encode()).hexdigest()
    return {"admin": Operator("admin", "operator", digest, "env AXME_FW_ADMIN_TOKEN")}
