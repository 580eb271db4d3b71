"""Sliding-window limits per agent: requests, actions and spend.

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
from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

__all__ = [
    "Exceeded",
    "LimitSpec",
    "OnExceed",
    "Reservation",
    "Windows",
    "retry_after_header",
]

SNAPSHOT_VERSION = 1
_REL_SLACK = 1e-9
# Distinct windows tracked per (agent, key); more are rebuilt on demand (one O(n) pass).
_MAX_CURSORS = 8
# Expired events are dropped from the front of the lists in batches of at least this size.
_COMPACT_MIN = 64


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


def _number(value: object) -> float | None:
    """``value`` as a finite float, or None (bools, strings, NaN and infinities are not)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _is_amount(value: object) -> bool:
    number = _number(value)
    return number is not None and number >= 0


class _Cursor:
    """Where one window of length ``per`` starts in a series, and the sum from there."""

    __slots__ = ("start", "total")

    def __init__(self, start: int, total: float) -> None:
        self.start = start
        self.total = total


class _Series:
    """Time-ordered events of one (agent, key): parallel lists with a live-head offset.

    Events before ``head`` are expired for every window (older than ``longest``). Each
    window asked for has a cursor with a running sum, so the unchanged-``per`` case costs
    O(1) amortised: each event is added once and passed once per cursor.
    """

    __slots__ = ("amounts", "cursors", "head", "longest", "times", "warned")

    def __init__(self, longest: float) -> None:
        self.times: list[float] = []
        self.amounts: list[float] = []
        self.head = 0
        self.longest = longest
        self.cursors: dict[float, _Cursor] = {}
        self.warned = False

    def live(self) -> int:
        return len(self.times) - self.head

    def cursor(self, per: float, now: float) -> _Cursor:
        found = self.cursors.get(per)
        if found is not None:
            if len(self.cursors) > 1:  # keep least recently used first, for eviction
                self.cursors[per] = self.cursors.pop(per)
            return found
        self.longest = max(self.longest, per)
        start = bisect_right(self.times, now, lo=self.head, key=lambda t: t + per)
        made = _Cursor(start, math.fsum(self.amounts[start:]))
        if len(self.cursors) >= _MAX_CURSORS:
            del self.cursors[next(iter(self.cursors))]
        self.cursors[per] = made
        return made

    def expire(self, now: float) -> None:
        times, amounts, end = self.times, self.amounts, len(self.times)
        for per, c in self.cursors.items():
            while c.start < end and times[c.start] + per <= now:
                c.total -= amounts[c.start]
                c.start += 1
            if c.start == end:
                c.total = 0.0  # shed accumulated float drift whenever a window empties
        while self.head < end and times[self.head] + self.longest <= now:
            self.head += 1
        if self.head == end:
            times.clear()
            amounts.clear()
            self.head = 0
            for c in self.cursors.values():
                c.start, c.total = 0, 0.0
        elif self.head >= _COMPACT_MIN and self.head * 2 >= end:
            self.compact()

    def compact(self) -> None:
        cut = self.head
        if cut:
            del self.times[:cut]
            del self.amounts[:cut]
            self.head = 0
            for c in self.cursors.values():
                c.start = max(0, c.start - cut)

    def used(self, per: float, now: float) -> float:
        c = self.cursor(per, now)
        self.expire(now)
        return max(c.total, 0.0)

    def record(self, amount: float, now: float) -> None:
        t = max(now, self.times[-1]) if self.times else now
        self.times.append(t)
        self.amounts.append(amount)
        for c in self.cursors.values():
            c.total += amount

    def retry_after(
        self, per: float, now: float, used: float, fits: Callable[[float], bool]
    ) -> float:
        """Seconds until enough of this window's oldest events expire that ``fits(usage)``."""
        freed = 0.0
        for i in range(self.cursor(per, now).start, len(self.times)):
            freed += self.amounts[i]
            if fits(used - freed):
                return self.times[i] + per - now
        return per


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
        self._series: dict[str, dict[str, _Series]] = {}
        self._held: dict[tuple[str, str], list[float]] = {}  # [reserved sum, count]
        self._reservations: dict[int, Reservation] = {}
        self._ids = itertools.count(1)

    # -- counting ---------------------------------------------------------------------

    def _get(self, agent: str, key: str) -> _Series | None:
        keys = self._series.get(agent)
        return None if keys is None else keys.get(key)

    def _get_or_add(self, agent: str, key: str, per: float) -> _Series:
        keys = self._series.setdefault(agent, {})
        series = keys.get(key)
        if series is None:
            series = keys[key] = _Series(per)
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
        self, series: _Series, spec: LimitSpec, now: float, used: float, amount: float
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
        series_out: list[dict[str, Any]] = []
        for agent, keys in self._series.items():
            for key, series in keys.items():
                if series.live() == 0:
                    continue
                events = [
                    [series.times[i], series.amounts[i]]
                    for i in range(series.head, len(series.times))
                ]
                series_out.append(
                    {
                        "agent": agent,
                        "key": key,
                        "longest": series.longest,
                        "warned": series.warned,
                        "events": events,
                    }
                )
        return {"version": SNAPSHOT_VERSION, "series": series_out}

    @classmethod
    def restore(cls, data: Mapping[str, Any], now: float) -> Windows:
        """Rebuild from :meth:`snapshot`, dropping events older than their series' longest
        window at ``now``. Garbage is skipped, never raised: a wrong version or shape gives
        an empty Windows, a malformed series or event is left out. Events dated after
        ``now`` (a clock stepped back) are dated ``now``."""
        windows = cls()
        if not isinstance(data, Mapping) or data.get("version") != SNAPSHOT_VERSION:
            return windows
        entries = data.get("series")
        if not isinstance(entries, list):
            return windows
        for entry in entries:
            if not isinstance(entry, Mapping):
                continue
            agent, key = entry.get("agent"), entry.get("key")
            longest, events = _number(entry.get("longest")), entry.get("events")
            if not (isinstance(agent, str) and isinstance(key, str) and agent and key):
                continue
            if longest is None or longest <= 0 or not isinstance(events, list):
                continue
            kept = _live_events(events, longest, now)
            if not kept:
                continue
            series = windows._get_or_add(agent, key, longest)
            series.longest = max(series.longest, longest)
            series.warned = series.warned or entry.get("warned") is True
            merged = sorted([*zip(series.times, series.amounts, strict=True), *kept])
            series.times = [t for t, _ in merged]
            series.amounts = [a for _, a in merged]
        return windows


def _live_events(events: list[Any], longest: float, now: float) -> list[tuple[float, float]]:
    """Well-formed ``[t, amount]`` pairs still inside ``longest`` at ``now``; the rest is
    skipped. Times after ``now`` are clamped to ``now``."""
    kept: list[tuple[float, float]] = []
    for event in events:
        if not (isinstance(event, list | tuple) and len(event) == 2):
            continue
        t, amount = _number(event[0]), _number(event[1])
        if t is None or amount is None or amount <= 0:
            continue
        if t + longest > now:
            kept.append((min(t, now), amount))
    return kept


def assume_lost(data: Mapping[str, Any], saved_at: float, interval: float) -> dict[str, Any]:
    """A snapshot taken ``interval`` before an unclean stop, made to err on refusing.

    Whatever was admitted after the last flush is lost with the process. We assume
    the agent kept the pace of its last ``interval`` before that flush: each series
    gets one extra event, dated ``saved_at``, of what it recorded in that interval.
    Counts may then be slightly high for one window, never low. Garbage passes through
    unchanged (``restore`` skips it).
    """
    out = dict(data)
    entries = data.get("series")
    if not isinstance(entries, list):
        return out
    patched: list[Any] = []
    for entry in entries:
        events = entry.get("events") if isinstance(entry, Mapping) else None
        if not isinstance(events, list):
            patched.append(entry)
            continue
        recent = 0.0
        for ev in events:
            if isinstance(ev, list | tuple) and len(ev) == 2:
                t, a = _number(ev[0]), _number(ev[1])
                if t is not None and a is not None and a > 0 and t > saved_at - interval:
                    recent += a
        patched.append({**entry, "events": [*events, [saved_at, recent]]} if recent else entry)
    out["series"] = patched
    return out
