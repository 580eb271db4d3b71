"""Pure core: the stored events behind :class:`axme_fw.limits.Windows`, and their snapshot form.

One :class:`Series` per (agent, key): time-ordered events with a running sum per window
length asked for. The snapshot is the JSON-serialisable form of all series
(:func:`to_snapshot`, :func:`from_snapshot`), and :func:`assume_lost` patches one taken
before an unclean stop. Standard library only, no I/O and no clock.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable, Mapping
from typing import Any

SNAPSHOT_VERSION = 1
# Distinct windows tracked per (agent, key); more are rebuilt on demand (one O(n) pass).
_MAX_CURSORS = 8
# Expired events are dropped from the front of the lists in batches of at least this size.
_COMPACT_MIN = 64


def finite_number(value: object) -> float | None:
    """``value`` as a finite float, or None (bools, strings, NaN and infinities are not)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


class _Cursor:
    """Where one window of length ``per`` starts in a series, and the sum from there."""

    __slots__ = ("start", "total")

    def __init__(self, start: int, total: float) -> None:
        self.start = start
        self.total = total


class Series:
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


def to_snapshot(series: Mapping[str, Mapping[str, Series]]) -> dict[str, Any]:
    """The JSON-serialisable form of ``series`` (agent → key → events); see
    :meth:`axme_fw.limits.Windows.snapshot`."""
    series_out: list[dict[str, Any]] = []
    for agent, keys in series.items():
        for key, one in keys.items():
            if one.live() == 0:
                continue
            events = [[one.times[i], one.amounts[i]] for i in range(one.head, len(one.times))]
            series_out.append(
                {
                    "agent": agent,
                    "key": key,
                    "longest": one.longest,
                    "warned": one.warned,
                    "events": events,
                }
            )
    return {"version": SNAPSHOT_VERSION, "series": series_out}


def from_snapshot(data: Mapping[str, Any], now: float) -> dict[str, dict[str, Series]]:
    """The series (agent → key → events) in a :func:`to_snapshot` value, live at ``now``;
    garbage is skipped, never raised. See :meth:`axme_fw.limits.Windows.restore`."""
    out: dict[str, dict[str, Series]] = {}
    if not isinstance(data, Mapping) or data.get("version") != SNAPSHOT_VERSION:
        return out
    entries = data.get("series")
    if not isinstance(entries, list):
        return out
    for entry in entries:
        if not isinstance(entry, Mapping):
            continue
        agent, key = entry.get("agent"), entry.get("key")
        longest, events = finite_number(entry.get("longest")), entry.get("events")
        if not (isinstance(agent, str) and isinstance(key, str) and agent and key):
            continue
        if longest is None or longest <= 0 or not isinstance(events, list):
            continue
        kept = _live_events(events, longest, now)
        if not kept:
            continue
        keys = out.setdefault(agent, {})
        series = keys.get(key)
        if series is None:
            series = keys[key] = Series(longest)
        series.longest = max(series.longest, longest)
        series.warned = series.warned or entry.get("warned") is True
        merged = sorted([*zip(series.times, series.amounts, strict=True), *kept])
        series.times = [t for t, _ in merged]
        series.amounts = [a for _, a in merged]
    return out


def _live_events(events: list[Any], longest: float, now: float) -> list[tuple[float, float]]:
    """Well-formed ``[t, amount]`` pairs still inside ``longest`` at ``now``; the rest is
    skipped. Times after ``now`` are clamped to ``now``."""
    kept: list[tuple[float, float]] = []
    for event in events:
        if not (isinstance(event, list | tuple) and len(event) == 2):
            continue
        t, amount = finite_number(event[0]), finite_number(event[1])
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
                t, a = finite_number(ev[0]), finite_number(ev[1])
                if t is not None and a is not None and a > 0 and t > saved_at - interval:
                    recent += a
        patched.append({**entry, "events": [*events, [saved_at, recent]]} if recent else entry)
    out["series"] = patched
    return out
