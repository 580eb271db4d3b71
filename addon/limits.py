"""Pure core: sliding-window limits per agent: requests, actions and spend.

Pure: standard library only, no I/O and no clock. Every call takes ``now`` (seconds, any
epoch, non-decreasing in practice), so tests drive time with plain floats.

Semantics, fixed here so every caller agrees:

- A window is rolling, not a calendar bucket. An event recorded at ``t`` counts while
  ``now < t + per`` and has expired at ``now == t + per`` exactly (half-open ``(now-per, now]``).
- Counting is per agent (all its instances together) and per key (``"requests"``,
  ``"actions.deploy"``, ``"cost_usd"``). Specs sharing a key share one event stream, so
  ``{max: 10, per: 1m}`` and ``{max: 100, per: 1h}`` on ``requests`` count the same events.
- Comparisons allow a relative slack of 1e-9 so that summed float costs (ten times 0.1
  against a max of 1.0) behave like the decimal arithmetic an operator expects.
- The clock is trusted to be non-decreasing. If ``now`` steps back, a new event is dated at
  the latest time already recorded (order is kept) and windows do not move back.
- A key whose ``per`` changes (hot reload) keeps its counts: events are retained for the
  longest window seen for that key and ``used`` is exact for the ``per`` asked. Growing a
  window cannot recover events already dropped under the shorter one.

The proxy's event loop is single-threaded, so :meth:`Windows.admit` (check and record) and
:meth:`Windows.reserve` are atomic by construction; nothing here locks.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from .limits_series import Series, finite_number, from_snapshot, to_snapshot
from .yamlnodes import format_duration

__all__ = [
    "AgentSpecs",
    "Exceeded",
    "LimitSpec",
    "OnExceed",
    "Reservation",
    "Windows",
    "agent_specs",
    "limit_detail",
    "retry_after_header",
]

_REL_SLACK = 1e-9


class OnExceed(StrEnum):
    KILL = "kill"
    PARK = "park"
    THROTTLE = "throttle"


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """One limit: at most ``max`` of ``key`` per rolling ``per`` seconds.

    Raises ValueError on construction if ``per`` is not a positive finite number, ``max`` is
    negative or not finite, ``warn_at`` is outside (0, 1], or ``key`` is empty.
    """

    key: str
    max: float
    per: float
    on_exceed: OnExceed
    warn_at: float | None = None

    def __post_init__(self) -> None:
        where = f"limit {self.key!r}"
        if not self.key:
            raise ValueError("limit: key must not be empty")
        if not (math.isfinite(self.per) and self.per > 0):
            raise ValueError(f"{where}: per must be a positive number of seconds, got {self.per}")
        if not (math.isfinite(self.max) and self.max >= 0):
            raise ValueError(f"{where}: max must be a non-negative number, got {self.max}")
        if self.warn_at is not None and not 0 < self.warn_at <= 1:
            raise ValueError(f"{where}: warn_at must be in (0, 1], got {self.warn_at}")


@dataclass(frozen=True, slots=True)
class Exceeded:
    """A refusal. ``used`` counts recorded usage in the window plus outstanding reservations
    on the same key. ``retry_after`` is the exact number of seconds until expiring events
    make room (rounding for a header is :func:`retry_after_header`'s job); when expiry alone
    can never make room (the amount or the reservations exceed ``max`` by themselves) it is
    ``spec.per``."""

    spec: LimitSpec
    used: float
    retry_after: float


@dataclass(frozen=True, slots=True)
class Reservation:
    """An estimate held against ``spec`` for an in-flight call; see :meth:`Windows.reserve`."""

    id: int
    agent: str
    spec: LimitSpec
    amount: float


def retry_after_header(seconds: float) -> str:
    """A ``Retry-After`` value: whole seconds, rounded up, at least 1.

    Raises ValueError if ``seconds`` is NaN or infinite (:class:`Exceeded` never is).
    """
    if not math.isfinite(seconds):
        raise ValueError(f"retry_after_header: not a finite number of seconds: {seconds}")
    return str(max(1, math.ceil(seconds)))


def _fits(total: float, limit: float) -> bool:
    return total <= limit + _REL_SLACK * max(1.0, limit)


def _below(total: float, limit: float) -> bool:
    return total < limit - _REL_SLACK * max(1.0, limit)


def _is_amount(value: object) -> bool:
    number = finite_number(value)
    return number is not None and number >= 0


class Windows:
    """Sliding windows per (agent, key). A rolling window, not calendar buckets: an event
    at t counts until t+per (exclusive: at ``now == t + per`` it no longer counts).

    Reservations (spend): before forwarding an LLM call the proxy reserves an estimate;
    after the response it settles with the real cost. Outstanding reservations count
    against every check on their key, :meth:`admit` included.

    Overshoot bound. :meth:`reserve` admits an estimate ``a`` only if ``used + reserved + a
    <= max``, or, when that fails, if nothing else is reserved on the key and ``used < max``.
    Hence at every moment ``used + reserved < max + a_max`` (``a_max``: the largest single
    estimate), whatever the number of calls in flight. Recorded spend can pass ``max`` by
    less than one estimate, plus whatever in-flight calls cost beyond their estimates.
    """

    def __init__(self) -> None:
        self._series: dict[str, dict[str, Series]] = {}
        self._held: dict[tuple[str, str], list[float]] = {}  # [reserved sum, count]
        self._reservations: dict[int, Reservation] = {}
        self._ids = itertools.count(1)

    # -- counting ---------------------------------------------------------------------

    def _get(self, agent: str, key: str) -> Series | None:
        keys = self._series.get(agent)
        return None if keys is None else keys.get(key)

    def _get_or_add(self, agent: str, key: str, per: float) -> Series:
        keys = self._series.setdefault(agent, {})
        series = keys.get(key)
        if series is None:
            series = keys[key] = Series(per)
        return series

    def used(self, agent: str, key: str, per: float, now: float) -> float:
        """Recorded usage of ``key`` by ``agent`` in the window ``(now - per, now]``.

        Reservations are not included (see :meth:`reserved`). Side effect: expired events
        are dropped and ``per`` is remembered as a window of the key.
        """
        series = self._get(agent, key)
        return 0.0 if series is None else series.used(per, now)

    def reserved(self, agent: str, key: str) -> float:
        """The sum of outstanding reservations of ``agent`` on ``key``."""
        held = self._held.get((agent, key))
        return 0.0 if held is None else held[0]

    def admit(
        self, agent: str, specs: Sequence[LimitSpec], now: float, amount: float = 1.0
    ) -> Exceeded | None:
        """Check ``amount`` against every spec, then record it, atomically.

        If for every spec ``used + reserved + amount <= max``, ``amount`` is recorded once
        under each distinct key and None is returned. Otherwise nothing is recorded and the
        first failing spec, in the order given, is returned as :class:`Exceeded`.
        Raises ValueError if ``amount`` is negative or not finite.
        """
        if not _is_amount(amount):
            raise ValueError(f"admit: amount must be a non-negative number, got {amount}")
        longest: dict[str, float] = {}
        for spec in specs:
            series = self._get_or_add(agent, spec.key, spec.per)
            used = series.used(spec.per, now) + self.reserved(agent, spec.key)
            if not _fits(used + amount, spec.max):
                return self._exceeded(series, spec, now, used, amount)
            longest[spec.key] = max(longest.get(spec.key, 0.0), spec.per)
        if amount > 0:
            for key in longest:
                self._get_or_add(agent, key, longest[key]).record(amount, now)
        return None

    def _exceeded(
        self, series: Series, spec: LimitSpec, now: float, used: float, amount: float
    ) -> Exceeded:
        def fits(u: float) -> bool:
            return _fits(u + amount, spec.max)

        return Exceeded(spec, used, series.retry_after(spec.per, now, used, fits))

    # -- reservations -----------------------------------------------------------------

    def reserve(
        self, agent: str, spec: LimitSpec, amount: float, now: float
    ) -> Reservation | Exceeded:
        """Hold ``amount`` (an estimate) against ``spec`` until :meth:`settle`/:meth:`release`.

        Admitted if ``used + reserved + amount <= max``, or if nothing else is reserved on
        the key and ``used < max`` (a lone call may overshoot by its own estimate); refused
        otherwise, in particular whenever ``used + reserved >= max``. See the class
        docstring for the resulting bound. Raises ValueError for a negative or non-finite
        ``amount``.
        """
        if not _is_amount(amount):
            raise ValueError(f"reserve: amount must be a non-negative number, got {amount}")
        series = self._get_or_add(agent, spec.key, spec.per)
        used = series.used(spec.per, now)
        held = self.reserved(agent, spec.key)
        alone = (agent, spec.key) not in self._held

        def fits(u: float) -> bool:
            return _fits(u + held + amount, spec.max) or (alone and _below(u, spec.max))

        if not fits(used):
            return Exceeded(spec, used + held, series.retry_after(spec.per, now, used, fits))
        reservation = Reservation(next(self._ids), agent, spec, amount)
        self._reservations[reservation.id] = reservation
        entry = self._held.setdefault((agent, spec.key), [0.0, 0])
        entry[0] += amount
        entry[1] += 1
        return reservation

    def _drop(self, reservation: Reservation) -> bool:
        if self._reservations.pop(reservation.id, None) is None:
            return False
        slot = (reservation.agent, reservation.spec.key)
        entry = self._held[slot]
        entry[1] -= 1
        entry[0] -= reservation.amount
        if entry[1] <= 0:
            del self._held[slot]  # back to exactly zero, no float residue
        return True

    def settle(self, reservation: Reservation, actual: float, now: float) -> None:
        """Release ``reservation`` and record ``actual`` at ``now`` in its place.

        Settling (or settling after releasing) twice is a no-op. If ``actual`` is not a
        finite non-negative number the estimate is recorded instead: spend is never lost.
        """
        if not self._drop(reservation):
            return
        amount = actual if _is_amount(actual) else reservation.amount
        if amount > 0:
            spec = reservation.spec
            self._get_or_add(reservation.agent, spec.key, spec.per).record(amount, now)

    def release(self, reservation: Reservation) -> None:
        """Drop ``reservation`` without recording anything (the flow failed before any
        usage was known). Idempotent."""
        self._drop(reservation)

    # -- warnings, reset --------------------------------------------------------------

    def warn_crossed(self, agent: str, spec: LimitSpec, now: float) -> bool:
        """True exactly once when recorded usage reaches ``warn_at * max``; re-armed when
        usage falls back below it. False if ``spec.warn_at`` is None."""
        if spec.warn_at is None:
            return False
        series = self._get(agent, spec.key)
        used = 0.0 if series is None else series.used(spec.per, now)
        if _below(used, spec.warn_at * spec.max):
            if series is not None:
                series.warned = False
            return False
        if series is None:
            series = self._get_or_add(agent, spec.key, spec.per)
        if series.warned:
            return False
        series.warned = True
        return True

    def reset(self, agent: str, key: str | None = None) -> None:
        """Forget recorded usage (and warning state) of ``agent``, for ``key`` or all keys.

        Outstanding reservations are kept: those calls are in flight and will settle.
        """
        if key is None:
            self._series.pop(agent, None)
            return
        keys = self._series.get(agent)
        if keys is not None:
            keys.pop(key, None)
            if not keys:
                del self._series[agent]

    # -- memory, persistence ----------------------------------------------------------

    def prune(self, now: float, horizon: dict[str, float] | None = None) -> None:
        """Drop expired events, and series left empty; compact storage.

        ``horizon`` maps a key to the longest ``per`` any agent currently configures for it.
        It replaces the longest window remembered for that key (windows from older
        configurations are forgotten); keys not in it keep their own. Cost: O(live events).
        """
        for agent in list(self._series):
            keys = self._series[agent]
            for key in list(keys):
                series = keys[key]
                if horizon is not None and key in horizon and horizon[key] > 0:
                    limit = horizon[key]
                    series.longest = limit
                    for per in [p for p in series.cursors if p > limit]:
                        del series.cursors[per]
                series.expire(now)
                series.compact()
                if not series.times:
                    del keys[key]
            if not keys:
                del self._series[agent]

    def agents(self) -> list[str]:
        """Agents with any recorded usage (for status snapshots)."""
        return list(self._series)

    def snapshot(self) -> dict[str, Any]:
        """A JSON-serialisable copy of recorded usage (not reservations: in-flight calls do
        not survive the process). Read back with :meth:`restore`."""
        return to_snapshot(self._series)

    @classmethod
    def restore(cls, data: Mapping[str, Any], now: float) -> Windows:
        """Rebuild from :meth:`snapshot`, dropping events older than their series' longest
        window at ``now``. Garbage is skipped, never raised: a wrong version or shape gives
        an empty Windows, a malformed series or event is left out. Events dated after
        ``now`` (a clock stepped back) are dated ``now``."""
        windows = cls()
        windows._series = from_snapshot(data, now)
        return windows


@dataclass(frozen=True)
class AgentSpecs:
    """An agent's limits, prepared once per rules load for the per-request path."""

    requests: tuple[LimitSpec, ...]
    actions: dict[str, tuple[LimitSpec, ...]]
    cost: LimitSpec | None

    def all(self) -> list[LimitSpec]:
        out = [*self.requests, *(s for specs in self.actions.values() for s in specs)]
        return [*out, self.cost] if self.cost is not None else out


def agent_specs(limits: Sequence[Any]) -> AgentSpecs:
    requests: list[LimitSpec] = []
    actions: dict[str, tuple[LimitSpec, ...]] = {}
    cost = None
    for lim in limits:
        spec = LimitSpec(lim.key, lim.max, lim.per, OnExceed(lim.on_exceed), lim.warn_at)
        if lim.key == "requests":
            requests.append(spec)
        elif lim.key == "cost_usd":
            cost = spec
        else:
            name = lim.key.removeprefix("actions.")
            actions[name] = (*actions.get(name, ()), spec)
    return AgentSpecs(tuple(requests), actions, cost)


def limit_detail(ex: Exceeded) -> str:
    """``limits.actions.deploy: max 3 per 6h reached (3 used)``: for people and kill.yaml."""
    spec = ex.spec
    return (
        f"limits.{spec.key}: max {spec.max:g} per {format_duration(spec.per)} reached "
        f"({ex.used:g} used)"
    )
