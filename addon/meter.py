"""Pure core: spend metering for LLM calls: reserve an estimate, settle with real usage.

No mitmproxy, no I/O of its own, no clock: the addon awaits :meth:`Meter.begin` when a
request's body is known, :meth:`Meter.settle` when its response ended (or broke). Both
go through :class:`Counters` (a :class:`~axme_fw.store.Store`), which may be shared
between replicas: each is at most one store call.

Why reserve: N calls in flight at once each see the same spend and would all pass a
check made on spend alone, the way a $10 LiteLLM key spent $217. A reservation holds
each call's worst case (prompt size + its own ``max_tokens``) against the ceiling
until real usage replaces it. Bound (from :class:`axme_fw.limits.Windows`): spend +
reservations < ``max`` + the largest single estimate, whatever the concurrency;
recorded spend can exceed ``max`` by less than one estimate, plus whatever calls cost
beyond their estimates (a call without ``max_tokens`` is estimated at 4,096 output
tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .cost import ApiKind, Estimate, Pricing, StreamScanner, Usage, path_model, request_estimate
from .limits import Exceeded, LimitSpec, OnExceed, Reservation
from .yamlnodes import format_duration

# Spend of agents without a cost ceiling is still recorded, for status, per rolling day.
TRACK = LimitSpec("cost_usd", 1e15, 86400.0, OnExceed.THROTTLE)


@dataclass(frozen=True, slots=True)
class Spent:
    """What a settlement left in its window: recorded spend, and whether it just passed
    ``warn_at`` (true once per crossing, re-armed when spend falls back below)."""

    used: float
    warned: bool


class Readings(Protocol):
    def used(self, agent: str, key: str, per: float, now: float) -> float:
        """Recorded use in the window (a shared store: as last read; for people)."""
        ...


class Counters(Readings, Protocol):
    """The windows a meter charges: a :class:`axme_fw.store.Store`, which may share them
    between replicas (then each call is one atomic round trip)."""

    async def reserve(
        self, agent: str, spec: LimitSpec, amount: float, now: float
    ) -> Reservation | Exceeded: ...
    async def settle(
        self,
        agent: str,
        spec: LimitSpec,
        actual: float,
        now: float,
        reservation: Reservation | None = None,
    ) -> Spent:
        """Replace ``reservation`` by ``actual`` (without one: record ``actual``); never
        twice for one reservation."""
        ...

    def release(self, reservation: Reservation) -> None: ...


@dataclass(frozen=True, slots=True)
class Refused:
    reason: str  # "limit_exceeded" | "model_unpriced"
    detail: str
    exceeded: Exceeded | None = None


@dataclass(slots=True)
class Call:
    """One LLM call in flight."""

    agent: str
    kind: ApiKind
    estimate: Estimate
    estimate_usd: float
    spec: LimitSpec | None
    reservation: Reservation | None
    path_model: str | None
    scanner: StreamScanner | None = None  # streamed answers (SSE, Gemini streams)
    body: bytearray | None = None  # JSON answers, collected as they pass (bounded)
    settled: bool = field(default=False)


@dataclass(frozen=True, slots=True)
class Settled:
    usage: Usage | None
    usd: float
    unpriced: bool
    crossed: Exceeded | None  # the ceiling is now reached: apply its on_exceed
    warn: bool  # spend crossed warn_at for the first time in this window


class Meter:
    def __init__(self, windows: Counters, pricing: Pricing | None) -> None:
        self.windows = windows
        self.pricing = pricing

    async def begin(
        self, agent: str, kind: ApiKind, path: str, body: bytes, spec: LimitSpec | None, now: float
    ) -> Call | Refused:
        """Estimate the call and reserve it against ``spec``; refuse when already at the ceiling
        or when the model has no price and ``unpriced: deny``."""
        pm = path_model(path)
        est = request_estimate(kind, body, pm)
        usd = 0.0
        if self.pricing is None and spec is not None:
            return Refused("model_unpriced", "no pricing.yaml: spend against a ceiling is unknown")
        if self.pricing is not None:
            worst = Usage(est.model, est.input_tokens_est, est.max_output_tokens)
            priced = self.pricing.cost_usd(worst)
            if priced is None and self.pricing.unpriced == "deny":
                return Refused(
                    "model_unpriced", f"no price for model {est.model!r} in pricing.yaml"
                )
            usd = priced or 0.0
        reservation = None
        if spec is not None:
            got = await self.windows.reserve(agent, spec, usd, now)
            if isinstance(got, Exceeded):
                return Refused("limit_exceeded", cost_detail(got), got)
            reservation = got
        return Call(agent, kind, est, usd, spec, reservation, pm)

    async def settle(self, call: Call, usage: Usage | None, sent: bool, now: float) -> Settled:
        """Replace the reservation by the real cost. Never twice for one call.

        ``usage`` None with ``sent`` (the request left, no usage came back) charges the
        prompt estimate as partial: a broken call is never silently free.
        """
        if call.settled:
            return Settled(None, 0.0, False, None, False)
        call.settled = True
        if usage is None and sent:
            usage = Usage(call.estimate.model, call.estimate.input_tokens_est, 0, partial=True)
        elif usage is not None and usage.model is None:
            usage = Usage(
                call.estimate.model or call.path_model,
                usage.input_tokens,
                usage.output_tokens,
                usage.cached_input_tokens,
                usage.cache_write_tokens,
                usage.partial,
            )
        if usage is None:
            if call.reservation is not None:
                self.windows.release(call.reservation)
            return Settled(None, 0.0, False, None, False)
        priced = self.pricing.cost_usd(usage) if self.pricing is not None else None
        usd = priced if priced is not None else 0.0
        spec = call.spec
        if spec is None:  # no ceiling: the spend is only tracked (nothing to record: no call)
            if usd > 0:
                await self.windows.settle(call.agent, TRACK, usd, now)
            return Settled(usage, usd, priced is None, None, False)
        spent = await self.windows.settle(call.agent, spec, usd, now, call.reservation)
        crossed = Exceeded(spec, spent.used, spec.per) if spent.used >= spec.max else None
        return Settled(usage, usd, priced is None, crossed, spent.warned)


def usage_rows(
    windows: Readings, agent: str, limits: Sequence[Any], now: float
) -> list[dict[str, Any]]:
    """Each limit's use in its window, for status; plus the rolling day's spend when the
    agent has no cost ceiling but has spent something (``max`` is then None)."""
    rows = [
        {
            "key": lim.key,
            "used": windows.used(agent, lim.key, lim.per, now),
            "max": lim.max,
            "per": lim.per,
            "on_exceed": str(lim.on_exceed),
        }
        for lim in limits
    ]
    if not any(lim.key == TRACK.key for lim in limits):
        spent = windows.used(agent, TRACK.key, TRACK.per, now)
        if spent > 0:
            rows.append(
                {"key": TRACK.key, "used": spent, "max": None, "per": TRACK.per, "on_exceed": None}
            )
    return rows


def cost_detail(ex: Exceeded) -> str:
    spec = ex.spec
    return (
        f"limits.cost_usd: max ${spec.max:g} per {format_duration(spec.per)} reached "
        f"(${ex.used:.4f} spent or reserved)"
    )
