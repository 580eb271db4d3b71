"""Pure core: the per-request path, top to bottom, as plain code (no mitmproxy).

A request arrives as a :class:`Request` (what the hooks read off the flow) and leaves as
an :class:`Outcome` (what the hooks do with it). In order, first refusal wins:

1. one spelling: credentials (two are none), canonical host, method and path, the
   request names the host it goes to, unambiguous length, bounded headers
   (:mod:`axme_fw.canonical`); refused whatever the mode;
2. the admin listener: never reachable by agents (``control_forbidden``);
3. the control host ``axme-fw.local``: answered by the proxy itself;
4. :func:`axme_fw.policy.decide`: identity → kill list → inbound → allow list;
5. report mode: a refusal is recorded as ``would_*`` and the request goes on
   (never for a kill, never for a request without credentials);
6. limits (:meth:`Gate.limit`, awaited by the hook only when the agent has limits):
   the request and its actions are checked and recorded in one
   :meth:`Store.admit <axme_fw.store.Store.admit>`; on exceeding, throttle (429) or
   refuse and auto-kill (block or park). A kill that arrived while the store answered
   still wins, but for a policy's kill of a request the store admitted;
7. forward, noting whether it is an LLM call (its cost is reserved by :meth:`Gate.reserve`
   once the body is known and settled by :meth:`Gate.settle` when its answer ended).

Side effects are returned, not performed: decision records, audit events, alerts and an
auto-kill travel in the outcome, so the hooks stay the only place that touches a flow.
The only state the gate changes is through its :class:`~axme_fw.store.Store`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from . import canonical
from .canonical import Request
from .cost import ApiKind, Pricing, Usage, detect_api
from .identity import parse_proxy_auth
from .limits import (
    AgentSpecs,
    Exceeded,
    LimitSpec,
    OnExceed,
    agent_specs,
    limit_detail,
    retry_after_header,
)
from .meter import Call, Meter, Refused, cost_detail, usage_rows
from .policy import ANONYMOUS, Decision, Facts, Verdict, decide, identify
from .ruleset import EMPTY, Agent, Ruleset
from .store import Store, StoreUnavailable

CONTROL_HOST = "axme-fw.local"  # answered by the proxy itself, never forwarded
STORE_UNAVAILABLE = "store_unavailable"
NO_FACTS = Facts(None, None, "", 0, "", "")  # outcomes of the request hook (facts are past)


class Do(StrEnum):
    FORWARD = "forward"
    PARK = "park"
    REFUSE = "refuse"
    CONTROL = "control"  # a request to the control host: the proxy answers it
    OPEN = "open"  # a killed agent's tunnel opens, so each request inside gets the JSON 403


@dataclass(frozen=True, slots=True)
class AutoKill:
    agent: str
    mode: str  # "block" | "park"
    spec: LimitSpec
    detail: str


@dataclass(slots=True)
class Effects:
    """What the hooks write, send or enforce for an outcome, in this order."""

    records: list[tuple[Decision, bool]] = field(default_factory=list)  # (decision, would)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # audit
    alerts: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    auto_kill: AutoKill | None = None


@dataclass(slots=True)
class Outcome:
    do: Do
    decision: Decision
    facts: Facts
    status: int = 0  # for REFUSE: 403, 407, 429 or 431
    headers: dict[str, str] | None = None  # extra answer headers (Retry-After)
    identified: bool = False  # a known agent: the flow counts as its heartbeat
    path: str | None = None  # forward with this request target instead
    host: str | None = None  # connect to this spelling of the host instead
    llm: ApiKind | None = None
    limits: list[LimitSpec] | None = None  # step 6 is due: await Gate.limit
    fx: Effects = field(default_factory=Effects)


def _status(d: Decision) -> int:
    if d.verdict is Verdict.AUTH:
        return 407
    return {canonical.HEADERS_TOO_LARGE: 431, STORE_UNAVAILABLE: 503}.get(d.reason, 403)


class Gate:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.rules: Ruleset = EMPTY
        self.specs: dict[str, AgentSpecs] = {}
        self.meter = Meter(store, None)
        self.admin_targets: frozenset[tuple[str, int]] = frozenset()
        self._verified: dict[tuple[str, str], Agent] = {}  # (user, token) → agent

    def install(self, rules: Ruleset) -> None:
        old, self.rules = self.rules, rules
        if old.agents is not rules.agents:  # tokens or limits may have changed
            self._verified = {}
            self.specs = {n: agent_specs(a.limits) for n, a in rules.agents.items() if a.limits}

    @property
    def pricing(self) -> Pricing | None:
        return self.meter.pricing

    @pricing.setter
    def pricing(self, value: Pricing | None) -> None:
        self.meter.pricing = value

    # ------------------------------------------------------------ requests

    def request(self, req: Request) -> Outcome:
        """Steps 1-5 and 7 for a request (inside a tunnel or not). When the agent has limits
        that apply, ``out.limits`` is set: step 6 is due, ``await`` :meth:`limit`."""
        out = self._admission(req)
        d = out.decision
        if out.do is not Do.FORWARD or d.agent is None:
            return out
        out.llm = detect_api(out.facts.method, out.facts.path)
        entry = self.specs.get(d.agent)
        if entry is not None:
            specs = [*entry.requests]
            for action in d.actions:
                specs += entry.actions.get(action, ())
            out.limits = specs or None
        return out

    def connect(self, req: Request, passes_through: Callable[[str, int], bool]) -> Outcome:
        """Steps 1-5 for a CONNECT. A killed agent's tunnel that will be intercepted is
        opened (``Do.OPEN``): every request inside then gets the JSON 403, where a 403 to
        CONNECT loses its body and SDKs retry it. Nothing reaches upstream (lazy connect).
        """
        out = self._admission(req)
        d = out.decision
        if (
            out.do is Do.REFUSE
            and d.reason == "agent_killed"
            and not d.inbound
            and d.agent is not None
            and not passes_through(out.facts.host, out.facts.port)
        ):
            out.do, out.status = Do.OPEN, 0
        return out

    def _admission(self, req: Request) -> Outcome:
        """Steps 1-5: a forward, park, refusal or control outcome."""
        facts, bad, target = self.facts(req)
        if bad is None and not self.store.ready():  # never loaded the kill list: serve nothing
            why = "the kill list has not been read from the shared store yet"
            bad = self._named(facts, STORE_UNAVAILABLE, why)
        if bad is not None:
            return self._refused(facts, bad)
        if facts.host == CONTROL_HOST:  # identity only (not a decision record)
            _agent, refused = identify(self.rules, facts.user, facts.token)
            if refused is not None:
                return Outcome(Do.REFUSE, refused, facts, _status(refused))
            ok = Decision(Verdict.FORWARD, "control", facts.user)
            return Outcome(Do.CONTROL, ok, facts, path=target)
        d = self.decide(facts)
        out = Outcome(Do.FORWARD, d, facts, path=target)
        out.identified = d.agent is not None and d.reason != "unknown_agent"
        if req.host != facts.host and not req.connect:
            out.host = facts.host  # connect to the spelling the rules matched
        self._apply(out, d)
        return out

    def _apply(self, out: Outcome, d: Decision) -> None:
        """Record ``d`` and make ``out`` what it says: park or refuse (in report mode a
        refusal other than a kill or an identity one is recorded as ``would`` and goes on)."""
        report = self.rules.defaults.mode == "report" and d.reason != "agent_killed"
        if d.refused and report and d.verdict is not Verdict.AUTH:
            self._record(out, d, would=True)
            return
        self._record(out, d)
        if d.verdict is Verdict.PARK:
            out.do = Do.PARK
        elif d.refused:
            out.do, out.status = Do.REFUSE, _status(d)

    def facts(self, req: Request) -> tuple[Facts, Decision | None, str | None]:
        """Request facts in their one canonical spelling; a refusal when there is none
        (after identity, so a refusal names the agent; see :mod:`axme_fw.canonical`);
        the canonical request target when it differs from what was sent (forwarded
        instead: the upstream reads what the rules matched).
        """
        if req.two_auth:
            no = Facts(None, None, req.host.lower(), req.port, req.method.upper(), "")
            why = "two Proxy-Authorization"
            return no, Decision(Verdict.AUTH, "auth_required", None, why), None
        creds = parse_proxy_auth(req.auth) if req.auth else None
        if creds is None:
            creds = req.tunnel_auth
        user, token = creds if creds is not None else (None, None)
        target = None
        try:
            host = canonical.host(req.host)  # the destination, also for CONNECT
            method = canonical.method(req.method)
            path = ""
            if not req.connect:
                p = canonical.path(req.target)
                path, target = p.match, p.target if p.changed else None
            facts = Facts(user, token, host, req.port, method, path)
            if not req.connect:
                canonical.check_request(req, facts.host, facts.port)
        except canonical.NotCanonical as exc:
            raw = Facts(user, token, req.host.lower(), req.port, req.method.upper(), "")
            return raw, self._named(raw, exc.reason, exc.detail), None
        if (host, req.port) in self.admin_targets:
            why = "the admin API is for operators"
            return facts, self._named(facts, "control_forbidden", why), None
        return facts, None, target

    def _named(self, facts: Facts, reason: str, detail: str) -> Decision:
        """A refusal for ``reason`` that names the agent (or the identity refusal)."""
        agent, refused = identify(self.rules, facts.user, facts.token)
        if refused is not None:
            return refused
        name = agent.name if agent is not None else (facts.user or ANONYMOUS)
        return Decision(Verdict.DENY, reason, name, detail)

    def decide(self, facts: Facts) -> Decision:
        """:func:`policy.decide`, with verified credentials remembered for this ruleset.

        Only credentials that matched are remembered (a wrong token is hashed every
        time, so guesses cannot fill memory); the cache is dropped with the ruleset.
        """
        if facts.user is None or facts.token is None:
            return decide(self.rules, facts)
        key = (facts.user, facts.token)
        agent = self._verified.get(key)
        d = decide(self.rules, facts, agent)
        if agent is None and d.reason != "unknown_agent" and facts.user in self.rules.agents:
            self._verified[key] = self.rules.agents[facts.user]
        return d

    def _refused(self, facts: Facts, d: Decision) -> Outcome:
        out = Outcome(Do.REFUSE, d, facts, _status(d))
        self._record(out, d)
        return out

    def _record(self, out: Outcome, d: Decision, would: bool = False) -> None:
        policy = self.rules.defaults.audit_decisions
        if policy == "all" or (policy == "denied" and d.refused):
            out.fx.records.append((d, would))

    def usage(self, now: float, only: str | None = None) -> dict[str, list[dict[str, Any]]]:
        """Each agent's limits and their use, for status (``only`` one agent)."""
        out: dict[str, list[dict[str, Any]]] = {}
        for agent in [only] if only is not None else self.store.agents():
            entry = self.specs.get(agent)
            rows = usage_rows(self.store, agent, entry.all() if entry else [], now)
            if rows:
                out[agent] = rows
        return out

    # ------------------------------------------------------------ limits and cost

    async def limit(self, out: Outcome, now: float) -> None:
        """Step 6: count the request against its agent's windows, check and record in one
        store call, so concurrent requests (on any replica) never get more than ``max``
        through. ``out`` may become a refusal; a kill installed while the store answered
        is applied (its decision wins over the limits' verdict)."""
        d, specs = out.decision, out.limits
        assert d.agent is not None and specs is not None
        out.limits = None
        rules = self.rules
        try:
            ex = await self.store.admit(d.agent, specs, now)
        except StoreUnavailable as exc:
            self._unavailable(out, d.agent, str(exc))
            return
        if self.rules is not rules and self._redecided(out, admitted=ex is None):
            return
        if ex is None:
            return
        detail = limit_detail(ex)
        if self.rules.defaults.mode == "report":
            rule = f"limits.{ex.spec.key}"
            out.fx.events.append(
                ("limit.would_exceed", {"agent": d.agent, "rule": rule, "detail": detail})
            )
            return
        denied = dataclasses.replace(
            d, verdict=Verdict.DENY, reason="limit_exceeded", detail=detail
        )
        self._record(out, denied)
        self._exceeded(out, d.agent, ex, detail)

    def _redecided(self, out: Outcome, admitted: bool) -> bool:
        """The rules changed during the store call: decide again with the new ones (a kill
        or a revoked token wins). True when ``out`` stopped being a forward.

        A policy's kill spares a request the store ``admitted``: the store's serial order
        put it under the limit, before the request that exceeded it (on any replica), as
        the kill enforcer spares admitted work in flight. Refusing it would let fewer than
        ``max`` through, and waste a slot the store has recorded."""
        d = self.decide(out.facts)
        if not d.refused:
            return False
        if admitted and self._policy_killed_only(d):
            return False
        self._apply(out, d)
        if out.do is Do.FORWARD:
            return False
        out.decision, out.llm = d, None
        return True

    def _policy_killed_only(self, d: Decision) -> bool:
        """``d`` refuses its own agent for a kill, and every kill entry covering the agent
        is a policy's (an operator's kill, or one of a destination's, is never spared)."""
        if d.reason != "agent_killed" or d.inbound or d.agent is None:
            return False
        covering = self.rules.kills_for(d.agent)
        return bool(covering) and all(k.by.startswith("policy:") for k in covering)

    def _unavailable(self, out: Outcome, agent: str, why: str) -> None:
        """A shared limit or ceiling cannot be checked: fail closed (503)."""
        d = Decision(Verdict.DENY, STORE_UNAVAILABLE, agent, f"shared store unreachable: {why}")
        out.do, out.decision, out.status, out.llm = Do.REFUSE, d, 503, None
        self._record(out, d)

    def _exceeded(self, out: Outcome, agent: str, ex: Exceeded, detail: str) -> None:
        """Refuse for a limit, then apply the limit's ``on_exceed``."""
        spec = ex.spec
        out.do = Do.REFUSE
        out.decision = Decision(Verdict.DENY, "limit_exceeded", agent, detail)
        out.llm = None
        if spec.on_exceed is OnExceed.THROTTLE:
            retry = retry_after_header(ex.retry_after)
            out.status, out.headers = 429, {"Retry-After": retry}
            out.fx.events.append(
                (
                    "limit.throttled",
                    {"agent": agent, "rule": f"limits.{spec.key}", "retry_after": retry},
                )
            )
            return
        out.status = 403
        mode = "park" if spec.on_exceed is OnExceed.PARK else "block"
        out.fx.auto_kill = AutoKill(agent, mode, spec, detail)

    async def reserve(
        self, agent: str, kind: ApiKind, path: str, body: bytes, now: float
    ) -> Call | Outcome:
        """Reserve an LLM call's worst-case cost before it is sent; an outcome when it is
        refused (or, in report mode, would be: then it forwards unmetered)."""
        entry = self.specs.get(agent)
        spec = entry.cost if entry is not None else None
        try:
            got = await self.meter.begin(agent, kind, path, body, spec, now)
        except StoreUnavailable as exc:
            out = Outcome(Do.REFUSE, Decision(Verdict.DENY, "", agent), NO_FACTS, 503)
            self._unavailable(out, agent, str(exc))
            return out
        if not isinstance(got, Refused):
            return got
        d = Decision(Verdict.DENY, got.reason, agent, got.detail)
        out = Outcome(Do.REFUSE, d, NO_FACTS, 403)
        fields = {"agent": agent, "reason": got.reason, "detail": got.detail}
        if self.rules.defaults.mode == "report":
            out.do = Do.FORWARD
            out.fx.events.append(("cost.would_refuse", fields))
        elif got.exceeded is not None:
            self._exceeded(out, agent, got.exceeded, got.detail)
        else:
            out.fx.events.append(("cost.refused", fields))
        return out

    async def settle(self, call: Call, usage: Usage | None, sent: bool, now: float) -> Effects:
        """Replace a call's reservation by what it cost; the records and the auto-kill
        that follow (a crossed ceiling, a passed warning)."""
        fx = Effects()
        try:
            result = await self.meter.settle(call, usage, sent, now)
        except StoreUnavailable:  # pragma: no cover - a store keeps what it cannot send
            return fx
        if result.usage is not None:
            u = result.usage
            fx.events.append(
                (
                    "llm.usage",
                    {
                        "agent": call.agent,
                        "api": call.kind.value,
                        "model": u.model,
                        "input": u.input_tokens,
                        "output": u.output_tokens,
                        "cached_input": u.cached_input_tokens,
                        "cache_write": u.cache_write_tokens,
                        "usd": round(result.usd, 6),
                        "partial": u.partial,
                        "unpriced": result.unpriced,
                    },
                )
            )
        spec = call.spec
        if result.warn and spec is not None:
            warn = {"rule": "limits.cost_usd", "warn_at": spec.warn_at, "max": spec.max}
            fx.events.append(("budget.warning", {"agent": call.agent, **warn}))
            why = f"spend passed {spec.warn_at:.0%} of ${spec.max:g}"
            fx.alerts.append(("budget.warning", {"agent": call.agent, "reason": why}))
        crossed = result.crossed
        if (
            crossed is not None
            and crossed.spec.on_exceed is not OnExceed.THROTTLE
            and self.rules.kill_for(call.agent) is None
        ):
            mode = "park" if crossed.spec.on_exceed is OnExceed.PARK else "block"
            fx.auto_kill = AutoKill(call.agent, mode, crossed.spec, cost_detail(crossed))
        return fx
