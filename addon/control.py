"""Control: the proxy's own work beside requests, each a small object the addon starts.

- :class:`Reloader`: rules and prices re-read off the loop, swapped on the loop; a
  broken file keeps the last good rules (audited, alerted).
- :class:`KillEnforcer`: a kill-list change applied (in-flight work cut, parked flows
  answered or released, alerts), and auto-kills from policies.
- :class:`Publisher`: what the proxy enforces and what is live, for the CLI.
- :class:`Liveness`: heartbeats from traffic and the staleness sweep.

None of them touches a flow or blocks the loop; state goes through the
:class:`~axme_fw.store.Store`.
"""

from __future__ import annotations

import asyncio
import fnmatch
import functools
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import audit as audit_mod
from .cost import Pricing, PricingError, load_pricing
from .gate import AutoKill, Gate
from .health import stale_after
from .identity import instance_of
from .rules import KILL_FILE, PRICING_FILE, Loader, RulesError
from .ruleset import Kill, Ruleset
from .store import Store

log = logging.getLogger(__name__)

SWEEP_INTERVAL = 0.25  # staleness checks
Say = Callable[..., None]  # audit or alert: (event, **fields)


def load_pricing_file(rules_dir: Path) -> Pricing | PricingError | None:
    """``rules/pricing.yaml`` (None when absent: LLM calls of agents with a cost ceiling
    are then refused as unpriced, since their spend cannot be known)."""
    path = rules_dir / PRICING_FILE
    if not path.exists():
        return None
    try:
        return load_pricing(path)
    except PricingError as exc:
        return exc
    except OSError as exc:
        return PricingError(f"{path}:1: cannot read: {exc}")


def changes(old: Ruleset, new: Ruleset) -> str:
    """``agents +bot -old; actions +deploy; kills +deployer``: what a reload changed."""
    parts = []
    for what, a, b in (
        ("agents", set(old.agents), set(new.agents)),
        ("actions", set(old.actions), set(new.actions)),
        ("operators", set(old.operators), set(new.operators)),
        ("kills", {k.agent for k in old.kills}, {k.agent for k in new.kills}),
    ):
        diff = [f"+{x}" for x in sorted(b - a)] + [f"-{x}" for x in sorted(a - b)]
        if diff:
            shown = " ".join(diff[:10]) + (f" (+{len(diff) - 10} more)" if len(diff) > 10 else "")
            parts.append(f"{what} {shown}")
    return "; ".join(parts) or "no names changed (settings or tokens)"


class Reloader:
    """Re-read the rules off the loop; swap on the loop; keep the old ones if invalid.

    A change to kill.yaml alone takes a fast path on the loop (parse one small file,
    no thread hop): a kill must not wait behind a 10,000-agent merge or the GIL.
    """

    def __init__(
        self,
        loader: Loader,
        gate: Gate,
        install: Callable[[Ruleset], None],
        published: Callable[[], None],
        audit: Say,
        alert: Say,
    ) -> None:
        self.loader, self.gate = loader, gate
        self._install, self._published = install, published
        self._audit, self._alert = audit, alert
        self.loop: asyncio.AbstractEventLoop | None = None
        self._reloading = self._again = False

    def reload(self, changed: frozenset[str] = frozenset()) -> None:
        assert self.loop is not None
        if changed == {KILL_FILE} and not self._reloading:
            started = time.monotonic()
            try:
                rules = self.loader.load_kills(self.gate.rules)
            except RulesError as exc:
                self.rejected(exc)
                return
            if rules is not None:
                self.swap(rules, started)
                return
        if self._reloading:
            self._again = True
            return
        self._reloading = True
        started = time.monotonic()
        loader = self.loader

        def load_both() -> tuple[Ruleset, Pricing | PricingError | None]:
            return loader.load(), load_pricing_file(loader.directory)

        future = self.loop.run_in_executor(None, load_both)
        future.add_done_callback(functools.partial(self.reloaded, started))

    def reloaded(
        self, started: float, future: asyncio.Future[tuple[Ruleset, Pricing | PricingError | None]]
    ) -> None:
        self._reloading = False
        try:
            rules, pricing = future.result()
            if isinstance(pricing, PricingError):
                log.error("axme-fw: pricing rejected, keeping the last good prices: %s", pricing)
                self._audit("rules.rejected", errors=[str(pricing)], kept="pricing")
            elif pricing != self.gate.pricing:
                self.gate.pricing = pricing
                self._audit("pricing.reloaded", models=len(pricing.prices) if pricing else 0)
        except RulesError as exc:
            self.rejected(exc)
        except Exception as exc:  # unexpected: keep the last good rules, say so
            log.exception("axme-fw: rules reload failed; keeping the last good rules")
            self._audit("rules.rejected", errors=[repr(exc)], kept=self.gate.rules.digest)
        else:
            self.swap(rules, started)
        if self._again:
            self._again = False
            self.reload()

    def rejected(self, exc: RulesError) -> None:
        log.error("axme-fw: rules rejected, keeping the last good rules:\n%s", exc)
        self._audit("rules.rejected", errors=exc.messages[:50], kept=self.gate.rules.digest)
        self._alert("rules.rejected", agent="-", reason=exc.messages[0], errors=len(exc.messages))

    def swap(self, rules: Ruleset, started: float) -> None:
        if rules.digest == self.gate.rules.digest:
            return
        old = self.gate.rules
        self._install(rules)
        ms = round((time.monotonic() - started) * 1000, 2)
        log.info(
            "axme-fw: rules reloaded (%s, %.0f ms): %s", rules.digest[:12], ms, changes(old, rules)
        )
        self._audit("rules.reloaded", rules=rules.digest, revision=rules.kill_revision, ms=ms)
        self._published()


class KillEnforcer:
    """Apply kill-list changes to work in progress; turn policy verdicts into kills."""

    def __init__(
        self,
        store: Store,
        cut: Callable[[str, Kill], tuple[int, int]],
        live_agents: Callable[[], list[str]],
        lot: Any,
        audit: Say,
        alert: Say,
    ) -> None:
        self.store, self._cut, self._live = store, cut, live_agents
        self.lot = lot
        self._audit, self._alert = audit, alert

    def merged(self, rules: Ruleset) -> Ruleset:
        """``rules`` with the kills the store holds beyond the rules files (a kill in
        either holds)."""
        extra = self.store.kills(rules)
        return rules.with_kills((*extra, *rules.kills)) if extra else rules

    def enforce(self, old: Ruleset, new: Ruleset, spare: str | None = None) -> None:
        """Alert for the change; cut in-flight work of newly killed agents (except
        ``spare``, whose admitted work goes on); answer or release parked flows."""
        if old.kills == new.kills:
            return
        self._alerts(old, new)
        for agent in self._live():
            kill = new.kill_for(agent)
            if kill is None or kill.mode != "block" or old.kill_for(agent) == kill:
                continue
            if agent == spare or kill.by.startswith("policy:"):
                continue  # a policy's kill spares what was admitted under the limit
            connections, flows = self._cut(agent, kill)
            self._audit(
                "kill.enforced",
                agent=agent,
                pattern=kill.agent,
                flows_cut=flows,
                connections_cut=connections,
                revision=new.kill_revision,
            )
        for agent in self.lot.agents():
            kill = new.kill_for(agent)
            if kill is None:
                self.lot.release(agent)
            elif kill.mode == "block":
                self.lot.answer(agent, 403, "agent_killed", kill.reason, kill)

    def _alerts(self, old: Ruleset, new: Ruleset) -> None:
        """Alert (and reset health) for kill-list entries that appeared, changed or went."""
        before = {k.agent: k for k in old.kills}
        after = {k.agent: k for k in new.kills}
        for pattern, kill in after.items():
            if before.get(pattern) != kill:
                if kill.by.startswith("policy:"):
                    event = "agent.auto_killed"
                else:
                    event = "agent.paused" if kill.mode == "park" else "agent.killed"
                fields = {"mode": kill.mode, "reason": kill.reason, "by": kill.by}
                self._alert_once(event, pattern, kill, fields)
        now = time.time()
        for pattern in before.keys() - after.keys():
            self._alert_once("agent.resumed", pattern, before[pattern], {"by": before[pattern].by})
            self.store.reset_health(functools.partial(fnmatch.fnmatchcase, pat=pattern), now)

    def _alert_once(self, event: str, pattern: str, kill: Kill, fields: dict[str, Any]) -> None:
        """Every replica applies a shared kill; one of them alerts (the entry names it)."""
        send = functools.partial(self._alert, event, agent=pattern, **fields)
        self.store.claim(event, f"{pattern}@{kill.at}", send)

    def auto_kill(self, ak: AutoKill) -> Kill:
        """A policy's kill (or pause): held by the store at once, audited; the caller
        installs it (sparing what was admitted under the limit). ``resume`` undoes it."""
        by = f"policy:limits.{ak.spec.key}"
        kill = Kill(ak.agent, ak.mode, ak.detail, by, audit_mod.now_iso())  # type: ignore[arg-type]
        self.store.kill(kill)
        where = {"replica": self.store.replica} if self.store.replica is not None else {}
        self._audit(
            "agent.auto_killed",
            agent=ak.agent,
            mode=ak.mode,
            rule=f"limits.{ak.spec.key}",
            reason=ak.detail,
            by=by,
            **where,
        )
        return kill


class Publisher:
    """``enforced.json`` (with the rules snapshot) on every swap, ``live.json`` coalesced."""

    def __init__(
        self,
        store: Store,
        gate: Gate,
        addresses: Callable[[], tuple[list[str], str | None]],
        parked: Callable[[], dict[str, int]],
    ) -> None:
        self.store, self.gate = store, gate
        self._addresses, self._parked = addresses, parked
        self.loop: asyncio.AbstractEventLoop | None = None
        self._published: tuple[object, ...] = ()
        self._timer: asyncio.TimerHandle | None = None

    def enforced(self) -> None:
        if self.loop is None:
            return
        from . import snapshot

        rules = self.gate.rules
        published = (rules.agents, rules.actions, rules.defaults)
        if len(published) != len(self._published) or any(
            a is not b for a, b in zip(published, self._published, strict=True)
        ):
            self._published = published
            self.store.publish_rules(rules)
        listen, admin = self._addresses()
        self.store.ack(
            {
                "revision": rules.kill_revision,
                "rules": rules.digest,
                "pid": os.getpid(),
                "listen": listen,
                "at": audit_mod.now_iso(),
                "kills": snapshot.kills_json(rules),
                "admin": admin,
            }
        )

    def touch(self) -> None:
        """Schedule a ``live.json`` snapshot (coalesced, written off the loop)."""
        if self._timer is None and self.loop is not None:
            self._timer = self.loop.call_later(0.1, self._live)

    def _live(self) -> None:
        self._timer = None
        self.store.publish_live(
            {
                "pid": os.getpid(),
                "at": audit_mod.now_iso(),
                "parked": self._parked(),
                "health": self.store.health_snapshot(),
                "limits": self.gate.usage(time.time()),
            }
        )


class Liveness:
    """Every flow is a heartbeat; a sweep marks agents stale (alerted once)."""

    def __init__(self, store: Store, gate: Gate, tick: Callable[[], None], audit: Say, alert: Say):
        self.store, self.gate, self._tick = store, gate, tick
        self._audit, self._alert = audit, alert
        self.loop: asyncio.AbstractEventLoop | None = None

    def heartbeat(self, agent: str, peer: str | None, header: str | None) -> str:
        instance = instance_of(peer, header)
        if self.store.saw(agent, instance, time.time()):
            self.store.claim("agent.recovered", agent, functools.partial(self._recovered, agent))
        return instance

    def _recovered(self, agent: str) -> None:
        self._audit("agent.recovered", agent=agent)
        self._alert("agent.recovered", agent=agent, reason="traffic again")

    def _stale(self, agent: str) -> None:
        if self.gate.rules.kill_for(agent) is None:  # a killed agent is quiet by design
            self._audit("agent.stale", agent=agent, stale_after=self._stale_after(agent))
            self._alert("agent.stale", agent=agent, reason="no traffic or heartbeat")

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        loop.call_later(SWEEP_INTERVAL, self._sweep)

    def _stale_after(self, agent: str) -> float:
        return stale_after(self.gate.rules, agent)

    def _sweep(self) -> None:
        """Every SWEEP_INTERVAL: mark agents with no traffic for stale_after; alert once
        (once for the fleet: the store picks the replica that reports)."""
        assert self.loop is not None
        try:
            for agent in self.store.sweep(time.time(), self._stale_after):
                self.store.claim("agent.stale", agent, functools.partial(self._stale, agent))
            self._tick()
        except Exception:
            log.exception("axme-fw: health sweep failed")
        self.loop.call_later(SWEEP_INTERVAL, self._sweep)
