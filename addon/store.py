"""State: the one interface to what proxy replicas must share, and its local implementation.

The gate and the control side read and change shared state only through :class:`Store`.
Decisions that may need the shared store (:meth:`Store.admit`, :meth:`Store.reserve`,
:meth:`Store.settle`) are coroutines: a replica awaits Redis without blocking its loop,
and every other flow goes on meanwhile. Everything else returns at once.
:class:`LocalStore` is one process's truth: limit windows and health in memory (the
hot path), their durable copy in TinyDB flushed off the loop, auto-kills recorded in
``rules/kill.yaml``, and what the proxy enforces published in ``state/enforced.json``.
A Redis store is a second class with the same operations.

What must be atomic across replicas (one Lua script each in a shared store):

- :meth:`Store.admit`: check every window of a request and record it in all or none,
  so N replicas let exactly ``max`` through between them.
- :meth:`Store.reserve`: check spend + open reservations against the ceiling and hold
  the estimate, in one step.
- :meth:`Store.settle` / :meth:`Store.release`: replace a reservation by the real cost;
  idempotent (a retried settle never charges twice); reservations expire on their own
  in a shared store, so a dead replica does not hold budget forever.
- :meth:`Store.kill`: one write with a new kill-list revision.

Not atomic by design (last writer wins, read for people): health (``saw``/``sweep``),
usage reads (:meth:`Store.used`: what the replica last read), :meth:`Store.ack` and the
published snapshots. :meth:`Store.claim` makes one replica report a fleet-wide change
(stale, recovered, a kill-list alert) once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from . import killswitch, snapshot
from .health import Health, Seen
from .limits import Exceeded, LimitSpec, Reservation, Windows
from .limits_series import assume_lost
from .meter import Counters, Spent
from .rules import atomic_write
from .ruleset import Kill, Ruleset
from .state import LIVE_FILE, Snapshots

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 1.0  # at most this much of limit counts is at risk in a crash

Audit = Callable[..., None]


class StoreUnavailable(Exception):
    """The shared store could not be reached for a decision that needs it."""


class Store(Counters, Protocol):
    """Shared state, as the gate and the control side use it. All calls are made on the
    proxy's event loop and never block it."""

    # limits and spend: the meter's Counters (reserve, settle, release, used), and
    async def admit(
        self, agent: str, specs: Sequence[LimitSpec], now: float, amount: float = 1.0
    ) -> Exceeded | None: ...
    def agents(self) -> list[str]: ...

    # kill list and acknowledgements
    def kills(self, rules: Ruleset) -> tuple[Kill, ...]: ...
    def kill(self, kill: Kill) -> None: ...
    def ack(self, enforced: Mapping[str, Any]) -> None: ...

    # health
    def saw(self, agent: str, instance: str, now: float) -> bool: ...
    def sweep(self, now: float, stale_after: Callable[[str], float]) -> list[str]: ...
    def reset_health(self, pattern_matches: Callable[[str], bool], now: float) -> None: ...
    def claim(self, event: str, subject: str, then: Callable[[], None]) -> None: ...
    def seen(self, agent: str) -> Seen | None: ...
    def health_state(self, agent: str, kill_mode: str | None) -> str: ...
    def health_snapshot(self) -> dict[str, Any]: ...

    # publishing for the CLI
    def publish_rules(self, rules: Ruleset) -> None: ...
    def publish_live(self, live: Mapping[str, Any]) -> None: ...

    replica: str | None  # this process's id among replicas (None: alone)

    def ready(self) -> bool: ...  # the kill list is loaded: requests may be served
    def start(self, loop: asyncio.AbstractEventLoop) -> None: ...
    def close(self) -> None: ...


def _write_json(path: Path, build: Callable[[Ruleset], object], rules: Ruleset) -> None:
    atomic_write(path, json.dumps(build(rules)))


class LocalStore:
    """One process's state: memory first, files written by one thread in order."""

    def __init__(self, state_dir: Path, rules_dir: Path, audit: Audit) -> None:
        """Open the durable copy and restore from it (blocking: start-up only, before
        traffic). After a crash (no clean flag) the restored windows err on refusing."""
        state_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir, self.rules_dir = state_dir, rules_dir
        self.replica: str | None = None
        self._audit = audit
        self.loop: asyncio.AbstractEventLoop | None = None
        self.files = Snapshots(state_dir)
        self.windows = Windows()
        self.health = Health()
        saved = self.files.load("windows")
        if saved is not None:
            if saved.get("clean") is not True:
                at = saved.get("saved_at")
                at = at if isinstance(at, int | float) else time.time()
                saved = assume_lost(saved, float(at), FLUSH_INTERVAL)
                audit("limits.restored_after_crash", saved_at=at)
            self.windows = Windows.restore(saved, time.time())
        health = self.files.load("health")
        if health is not None:
            self.health = Health.restore(health)
        # Auto-kills enforced in memory until kill.yaml has them: agent → (kill, written).
        self.pending: dict[str, tuple[Kill, bool]] = {}
        self._windows_dirty = self._health_dirty = False
        self._flush_timer: asyncio.TimerHandle | None = None
        self.on_change: Callable[[], None] = lambda: None  # live snapshot wanted
        # One writer thread for state files: writes land in the order they were asked.
        self.writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="axme-fw-state")

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def ready(self) -> bool:
        return True  # the kill list is kill.yaml, read with the rules

    # ------------------------------------------------------------ limits and spend

    async def admit(
        self, agent: str, specs: Sequence[LimitSpec], now: float, amount: float = 1.0
    ) -> Exceeded | None:
        ex = self.windows.admit(agent, specs, now, amount)
        if ex is None:
            # Action limits (deploys) are rare and costly: make them durable at once.
            self._changed(urgent=any(s.key.startswith("actions.") for s in specs))
        return ex

    async def reserve(
        self, agent: str, spec: LimitSpec, amount: float, now: float
    ) -> Reservation | Exceeded:
        return self.windows.reserve(agent, spec, amount, now)

    async def settle(
        self,
        agent: str,
        spec: LimitSpec,
        actual: float,
        now: float,
        reservation: Reservation | None = None,
    ) -> Spent:
        if reservation is not None:
            self.windows.settle(reservation, actual, now)
        elif math.isfinite(actual) and actual > 0:
            self.windows.admit(agent, [spec], now, actual)
        self._changed()
        used = self.windows.used(agent, spec.key, spec.per, now)
        return Spent(used, self.windows.warn_crossed(agent, spec, now))

    def release(self, reservation: Reservation) -> None:
        self.windows.release(reservation)
        self._changed()

    def used(self, agent: str, key: str, per: float, now: float) -> float:
        return self.windows.used(agent, key, per, now)

    def agents(self) -> list[str]:
        return self.windows.agents()

    # ------------------------------------------------------------ kill list

    def kills(self, rules: Ruleset) -> tuple[Kill, ...]:
        """Auto-kills that ``rules`` (read from kill.yaml) do not hold yet.

        Once kill.yaml has a kill (or had it: it was written), the file is the truth,
        so ``axme-fw resume`` works as for any kill; until then it stays enforced here,
        so a reload racing the write cannot drop it.
        """
        out = []
        for agent, (kill, written) in list(self.pending.items()):
            if written or rules.kill_for(agent) is not None:
                del self.pending[agent]
            else:
                out.append(kill)
        return tuple(out)

    def kill(self, kill: Kill) -> None:
        """Hold ``kill`` now and record it in kill.yaml off the loop (retried while the
        file cannot be written, e.g. hand-broken: the kill is held here meanwhile)."""
        self.pending[kill.agent] = (kill, False)
        self._write_kill(kill, 1)

    def _write_kill(self, kill: Kill, attempt: int) -> None:
        assert self.loop is not None
        future = self.loop.run_in_executor(
            self.writer,
            killswitch.kill,
            self.rules_dir,
            kill.agent,
            kill.mode,
            kill.reason,
            kill.by,
            kill.at,
        )
        future.add_done_callback(functools.partial(self._kill_written, kill, attempt))

    def _kill_written(
        self, kill: Kill, attempt: int, future: asyncio.Future[killswitch.Change]
    ) -> None:
        try:
            change = future.result()
        except Exception as exc:
            log.error("axme-fw: auto-kill of %s not written to kill.yaml: %s", kill.agent, exc)
            if attempt == 1:
                self._audit("agent.auto_kill_unsaved", agent=kill.agent, error=str(exc))
            if self.loop is not None and kill.agent in self.pending:
                retry = functools.partial(self._write_kill, kill, attempt + 1)
                self.loop.call_later(min(30.0, 0.5 * 2**attempt), retry)
        else:
            if kill.agent in self.pending:
                self.pending[kill.agent] = (kill, True)
            self._audit("kill.written", agent=kill.agent, revision=change.revision)

    def ack(self, enforced: Mapping[str, Any]) -> None:
        """Publish what this proxy enforces (``state/enforced.json``): the CLI's kill waits
        for its revision."""
        self._write(self.state_dir / killswitch.ENFORCED_FILE, json.dumps(dict(enforced)))

    # ------------------------------------------------------------ health

    def saw(self, agent: str, instance: str, now: float) -> bool:
        self._health_dirty = True
        return self.health.saw(agent, instance, now)

    def sweep(self, now: float, stale_after: Callable[[str], float]) -> list[str]:
        stale = self.health.sweep(now, stale_after)
        if stale:
            self._health_dirty = True
        if self._health_dirty:
            self._changed()  # the durable copy carries health too
        return stale

    def reset_health(self, pattern_matches: Callable[[str], bool], now: float) -> None:
        for agent in list(self.health.agents):
            if pattern_matches(agent):
                self.health.reset(agent, now)

    def claim(self, event: str, subject: str, then: Callable[[], None]) -> None:
        """Run ``then`` if this process is the one to report ``event`` about ``subject``
        (an agent's ``agent.stale``/``agent.recovered``, a kill-list entry's alert) for
        the fleet: alone, it always is."""
        then()

    def seen(self, agent: str) -> Seen | None:
        return self.health.agents.get(agent)

    def health_state(self, agent: str, kill_mode: str | None) -> str:
        return self.health.state(agent, kill_mode)

    def health_snapshot(self) -> dict[str, Any]:
        return self.health.snapshot()

    # ------------------------------------------------------------ publishing

    def publish_rules(self, rules: Ruleset) -> None:
        """What status and env read while a file on disk is broken (built off the loop)."""
        if self.loop is not None:
            path = self.state_dir / snapshot.RULES_FILE
            self.loop.run_in_executor(self.writer, _write_json, path, snapshot.rules_json, rules)

    def publish_live(self, live: Mapping[str, Any]) -> None:
        self._write(self.state_dir / LIVE_FILE, json.dumps(dict(live)))

    def _write(self, path: Path, data: str) -> None:
        if self.loop is not None:
            self.loop.run_in_executor(self.writer, atomic_write, path, data)

    # ------------------------------------------------------------ durability

    def _changed(self, urgent: bool = False) -> None:
        self._windows_dirty = True
        if self.loop is None:
            return
        if urgent and self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self._flush_timer is None:
            delay = 0.0 if urgent else FLUSH_INTERVAL
            self._flush_timer = self.loop.call_later(delay, self._flush)
        self.on_change()

    def _flush(self) -> None:
        """Hand a snapshot to the writer thread: at most ``FLUSH_INTERVAL`` of counts at risk."""
        self._flush_timer = None
        if not self._windows_dirty or self.loop is None:
            return
        self._windows_dirty = False
        snap = {**self.windows.snapshot(), "saved_at": time.time(), "clean": False}
        self.loop.run_in_executor(self.writer, self.files.save, "windows", snap)
        if self._health_dirty:
            self._health_dirty = False
            health = self.health.snapshot()
            self.loop.run_in_executor(self.writer, self.files.save, "health", health)

    def discard(self) -> None:
        """Let go of the files without saving: this store is being replaced."""
        self.writer.shutdown(wait=True)
        self.files.close()

    def close(self) -> None:
        """Pending writes first, then a clean copy (blocking: shutdown only). Nothing is
        scheduled after this (the loop may still turn while mitmproxy stops)."""
        self.loop = None
        if self._flush_timer is not None:
            self._flush_timer.cancel()
        self.writer.shutdown(wait=True)
        self.files.save("windows", {**self.windows.snapshot(), "clean": True})
        self.files.save("health", self.health.snapshot())
        self.files.close()
        (self.state_dir / LIVE_FILE).unlink(missing_ok=True)
