"""Pure core: the decision: one pure function from rules and request facts to a verdict.

Evaluation order, first match wins (DESIGN.md "Decisions on a request"):

1. identity: no credentials → ``auth_required`` (407); unknown agent or wrong token →
   ``unknown_agent`` (403), unless ``defaults.unknown_agents: allow`` (a *known* agent
   with a wrong token is refused even then: that is impersonation);
2. kill list: the agent matches a kill entry → ``agent_killed`` (403) or park;
3. inbound: the destination is a killed agent's ``addresses`` → ``agent_killed`` (403);
4. allow list: no allowed action matches → ``action_not_allowed`` (403);
5. forward, carrying the matched actions so the caller can apply limits.

Limits (step 5 of the design) are stateful and applied by the caller with
:mod:`axme_fw.limits`; this module stays free of I/O, clocks and mitmproxy.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from enum import StrEnum

from .ruleset import Agent, Kill, Ruleset, token_digest


class Verdict(StrEnum):
    FORWARD = "forward"
    DENY = "deny"
    PARK = "park"
    THROTTLE = "throttle"
    AUTH = "auth_required"


@dataclass(frozen=True, slots=True)
class Facts:
    """What the proxy knows about one request (or CONNECT) before it is sent."""

    user: str | None  # proxy-credential username, None when there were none
    token: str | None
    host: str
    port: int
    method: str  # "CONNECT" for a tunnel
    path: str  # "" for a CONNECT


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    reason: str  # stable: "ok", "agent_killed", "action_not_allowed", "unknown_agent", ...
    agent: str | None  # the identified agent (None when not identified)
    detail: str = ""  # for people and the audit log; never contains a credential
    kill: Kill | None = None
    actions: tuple[str, ...] = ()  # the allowed actions this request matches
    inbound: bool = False  # refused because the destination is a killed agent's address

    @property
    def refused(self) -> bool:
        return self.verdict is not Verdict.FORWARD


ANONYMOUS = "anonymous"


def identify(
    rules: Ruleset, user: str | None, token: str | None
) -> tuple[Agent | None, Decision | None]:
    """Return ``(agent, None)`` or ``(None, refusal)``; ``(None, None)`` is an allowed unknown."""
    if user is None:
        if rules.defaults.unknown_agents == "allow":
            return None, None
        return None, Decision(Verdict.AUTH, "auth_required", None, "no proxy credentials")
    agent = rules.agents.get(user)
    if agent is None:
        if rules.defaults.unknown_agents == "allow":
            return None, None
        return None, Decision(Verdict.DENY, "unknown_agent", user, "no such agent")
    if not hmac.compare_digest(token_digest(token or ""), agent.token_sha256):
        return None, Decision(Verdict.DENY, "unknown_agent", user, "token does not match")
    return agent, None


def decide(rules: Ruleset, facts: Facts, verified: Agent | None = None) -> Decision:
    """Decide one request or CONNECT. Pure: the same inputs give the same decision.

    ``verified``: the agent the caller already checked these credentials against (a
    cache of :func:`identify` for this ruleset); skips the token hash.
    """
    if verified is not None:
        agent: Agent | None = verified
    else:
        agent, refusal = identify(rules, facts.user, facts.token)
        if refusal is not None:
            return refusal
    name = agent.name if agent is not None else (facts.user or ANONYMOUS)

    kill = rules.kill_for(name)
    if kill is not None:
        verdict = Verdict.PARK if kill.mode == "park" else Verdict.DENY
        return Decision(verdict, "agent_killed", name, kill.reason, kill)

    target = rules.agent_at(facts.host, facts.port)
    if target is not None:
        tkill = rules.kill_for(target)
        if tkill is not None:
            detail = f"destination belongs to killed agent {target!r}"
            return Decision(Verdict.DENY, "agent_killed", name, detail, tkill, inbound=True)

    if agent is None:  # an allowed unknown: no allow list applies
        return Decision(Verdict.FORWARD, "ok", name)
    matched = match_actions(rules, agent, facts)
    if matched is None:
        dest = (
            f"{facts.host}:{facts.port}"
            if facts.method == "CONNECT"
            else (f"{facts.method} {facts.host}{facts.path.split('?', 1)[0]}")
        )
        return Decision(
            Verdict.DENY, "action_not_allowed", name, f"{dest} is not in the allow list"
        )
    return Decision(Verdict.FORWARD, "ok", name, actions=matched)


def match_actions(rules: Ruleset, agent: Agent, facts: Facts) -> tuple[str, ...] | None:
    """Allowed actions matching the request; ``None`` when nothing allows it.

    A CONNECT only knows the host, so any allowed action on that host admits the
    tunnel; each request inside it is then checked in full.
    """
    host = facts.host.lower()
    hostport = f"{host}:{facts.port}"
    connect = facts.method == "CONNECT"
    path = facts.path.split("?", 1)[0]
    actions = rules.actions
    matched: list[str] = []
    star = False
    for name in agent.allow:
        if name == "*":
            star = True
            continue
        action = actions[name]
        if connect:
            ok = action.matches_target(host, hostport)
        else:
            ok = action.matches_request(host, hostport, facts.method, path)
        if ok:
            matched.append(name)
    if not matched and not star:
        return None
    # Actions an agent is limited on count even when "*" is what allows the request.
    if star and not connect:
        for lim in agent.limits:
            if lim.key.startswith("actions."):
                aname = lim.key[8:]
                if aname not in matched and actions[aname].matches_request(
                    host, hostport, facts.method, path
                ):
                    matched.append(aname)
    return tuple(matched)
