"""The per-request pipeline as a table: Request in, Outcome out. No mitmproxy, no taddons."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Sequence
from pathlib import Path

import pytest

from axme_fw.canonical import Request
from axme_fw.cost import ApiKind
from axme_fw.gate import CONTROL_HOST, Do, Gate, Outcome
from axme_fw.limits import Exceeded, LimitSpec
from axme_fw.rules import load_dir
from axme_fw.store import LocalStore
from tests.rig import agents_yaml

BASE = """\
version: 1
defaults:
  audit: {decisions: all}
actions:
  api: {hosts: [api.example.com], methods: [GET]}
  deploy: {hosts: [deploy.example.com], methods: [POST], paths: ["/v1/deploy"]}
  llm: {hosts: [api.openai.com], methods: [POST]}
"""
NOW = 1_000_000.0


def auth(user: str, token: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()


def make(tmp_path: Path, mode: str = "enforce", kills: str = "kills: []\n") -> Gate:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "base.yaml").write_text(BASE.replace("audit:", f"mode: {mode}\n  audit:"))
    (rules / "agents.yaml").write_text(
        agents_yaml(
            {
                "bot": ("t0k", ["api", "llm"]),
                "deployer": ("d3p", ["deploy"]),
                "chatty": ("ch4", ["api"]),
                "killed": ("k1l", ["api"]),
            },
            deployer="limits:\n  actions:\n    deploy: {max: 3, per: 6h, on_exceed: kill}",
            chatty="limits:\n  requests: {max: 2, per: 1m, on_exceed: throttle}",
        )
    )
    (rules / "kill.yaml").write_text(kills)
    gate = Gate(LocalStore(tmp_path / "state", rules, lambda *a, **k: None))
    gate.install(load_dir(rules))
    return gate


def req(
    user: str | None = "bot",
    token: str = "t0k",
    method: str = "GET",
    host: str = "api.example.com",
    target: str = "/x",
    **kw: object,
) -> Request:
    a = auth(user, token) if user is not None else None
    fields: dict[str, object] = {"port": 443, "scheme": "https", "target": target}
    fields.update(kw)
    return Request(a, False, None, method, host, **fields)  # type: ignore[arg-type]


KILL = "kills: [{agent: killed, reason: runaway, by: 'cli:alice'}]\n"


def decide(gate: Gate, request: Request) -> Outcome:
    """What the hook does: steps 1-5 and 7, then step 6 awaited when it is due."""
    out = gate.request(request)
    if out.limits is not None:
        asyncio.run(gate.limit(out, NOW))
    return out


# (name, request, (do, status, reason))
TABLE = [
    ("allowed", req(), (Do.FORWARD, 0, "ok")),
    ("no credentials", req(user=None), (Do.REFUSE, 407, "auth_required")),
    ("wrong token", req(token="nope"), (Do.REFUSE, 403, "unknown_agent")),
    ("unknown agent", req(user="ghost"), (Do.REFUSE, 403, "unknown_agent")),
    ("not allowed host", req(host="evil.example.com"), (Do.REFUSE, 403, "action_not_allowed")),
    ("not allowed method", req(method="DELETE"), (Do.REFUSE, 403, "action_not_allowed")),
    ("killed", req("killed", "k1l"), (Do.REFUSE, 403, "agent_killed")),
    ("lower-case method", req(method="get"), (Do.REFUSE, 403, "method_not_canonical")),
    ("encoded slash", req(target="/a%2fb"), (Do.REFUSE, 403, "path_not_canonical")),
    ("dot-dot above root", req(target="/../x"), (Do.REFUSE, 403, "path_not_canonical")),
    ("numeric host", req(host="2130706433"), (Do.REFUSE, 403, "host_not_canonical")),
    (
        "host header elsewhere",
        req(host_headers=("evil.example.com",)),
        (Do.REFUSE, 403, "host_mismatch"),
    ),
    ("two hosts", req(host_headers=("a", "b")), (Do.REFUSE, 403, "host_mismatch")),
    (
        "tunnel to another host",
        req(tunnel=("other.example.com", 443)),
        (Do.REFUSE, 403, "host_mismatch"),
    ),
    ("CL and TE", req(lengths=1, chunked=True), (Do.REFUSE, 403, "ambiguous_length")),
    ("huge headers", req(header_bytes=70_000), (Do.REFUSE, 431, "headers_too_large")),
    ("control host", req(host=CONTROL_HOST, target="/status"), (Do.CONTROL, 0, "control")),
    (
        "control host, no credentials",
        req(user=None, host=CONTROL_HOST),
        (Do.REFUSE, 407, "auth_required"),
    ),
]


@pytest.mark.parametrize(("name", "request_", "expected"), TABLE, ids=[t[0] for t in TABLE])
def test_pipeline_table(
    tmp_path: Path, name: str, request_: Request, expected: tuple[Do, int, str]
) -> None:
    gate = make(tmp_path, kills=KILL)
    out = decide(gate, request_)
    assert (out.do, out.status, out.decision.reason) == expected, out


def test_two_credentials_are_none(tmp_path: Path) -> None:
    gate = make(tmp_path)
    r = Request(auth("bot", "t0k"), True, None, "GET", "api.example.com", 443, "/x")
    out = decide(gate, r)
    assert (out.do, out.status, out.decision.reason) == (Do.REFUSE, 407, "auth_required")


def test_admin_listener_is_control_forbidden_whatever_the_allow_list(tmp_path: Path) -> None:
    gate = make(tmp_path)
    gate.admin_targets = frozenset({("api.example.com", 443)})
    out = decide(gate, req())
    assert (out.do, out.decision.reason, out.decision.agent) == (
        Do.REFUSE,
        "control_forbidden",
        "bot",
    )


def test_path_is_forwarded_canonical_and_host_in_its_one_spelling(tmp_path: Path) -> None:
    gate = make(tmp_path)
    out = decide(gate, req(host="API.example.com.", target="/a/./b/../x"))
    assert out.do is Do.FORWARD
    assert (out.path, out.host) == ("/a/x", "api.example.com")


def test_the_fourth_deploy_is_refused_and_kills_the_agent(tmp_path: Path) -> None:
    gate = make(tmp_path)
    deploy = req("deployer", "d3p", "POST", "deploy.example.com", "/v1/deploy")
    for _ in range(3):
        assert decide(gate, deploy).do is Do.FORWARD
    out = decide(gate, deploy)
    assert (out.do, out.status, out.decision.reason) == (Do.REFUSE, 403, "limit_exceeded")
    assert out.fx.auto_kill is not None
    assert (out.fx.auto_kill.agent, out.fx.auto_kill.mode) == ("deployer", "block")
    assert "limits.actions.deploy: max 3 per 6h reached (3 used)" in out.decision.detail


def test_a_throttled_request_gets_429_with_retry_after_and_no_kill(tmp_path: Path) -> None:
    gate = make(tmp_path)
    chatty = req("chatty", "ch4")
    assert [decide(gate, chatty).do for _ in range(2)] == [Do.FORWARD] * 2
    out = decide(gate, chatty)
    assert (out.do, out.status) == (Do.REFUSE, 429)
    assert out.headers is not None and int(out.headers["Retry-After"]) > 0
    assert out.fx.auto_kill is None
    assert out.fx.events[0][0] == "limit.throttled"


def test_report_mode_forwards_refusals_as_would_records_but_never_a_kill(tmp_path: Path) -> None:
    gate = make(tmp_path, mode="report", kills=KILL)
    out = decide(gate, req(host="evil.example.com"))
    assert out.do is Do.FORWARD
    assert [(d.reason, would) for d, would in out.fx.records] == [("action_not_allowed", True)]
    killed = decide(gate, req("killed", "k1l"))
    assert (killed.do, killed.decision.reason) == (Do.REFUSE, "agent_killed")
    odd = decide(gate, req(target="/a%2fb"))  # no "would" for a path meaning two things
    assert odd.do is Do.REFUSE


def test_llm_calls_are_marked_and_unpriced_ceilings_refused(tmp_path: Path) -> None:
    gate = make(tmp_path)
    out = decide(gate, req(method="POST", host="api.openai.com", target="/v1/chat/completions"))
    assert (out.do, out.llm) == (Do.FORWARD, ApiKind.OPENAI_CHAT)
    call = asyncio.run(gate.reserve("bot", ApiKind.OPENAI_CHAT, "/v1/chat/completions", b"{}", NOW))
    assert not hasattr(call, "do")  # no ceiling: reserved (tracked), not refused


def test_a_killed_agents_tunnel_opens_unless_it_passes_through(tmp_path: Path) -> None:
    gate = make(tmp_path, kills=KILL)
    connect = req("killed", "k1l", "CONNECT", target="", connect=True)
    assert gate.connect(connect, lambda h, p: False).do is Do.OPEN
    passed = gate.connect(connect, lambda h, p: True)
    assert (passed.do, passed.status) == (Do.REFUSE, 403)


def test_a_kill_installed_while_the_store_answers_wins_over_the_limits(tmp_path: Path) -> None:
    """Step 6 awaits the store (Redis, for replicas); a kill that lands meanwhile refuses
    the request the store has just admitted: nothing the new rules refuse goes on."""
    gate = make(tmp_path)
    rules = tmp_path / "rules"
    (rules / "kill.yaml").write_text("kills: [{agent: deployer, reason: stop, by: 'cli:bob'}]\n")
    killed = load_dir(rules)
    store = gate.store
    admit = store.admit

    async def slow_admit(
        agent: str, specs: Sequence[LimitSpec], now: float, amount: float = 1.0
    ) -> Exceeded | None:
        gate.install(killed)  # what the watcher does when a kill arrives mid-call
        return await admit(agent, specs, now, amount)

    store.admit = slow_admit  # type: ignore[method-assign]
    out = decide(gate, req("deployer", "d3p", "POST", "deploy.example.com", "/v1/deploy"))
    assert (out.do, out.status, out.decision.reason) == (Do.REFUSE, 403, "agent_killed")
    assert out.decision.detail == "stop"


POLICY_KILL = "{agent: deployer, reason: stop, by: 'policy:limits.actions.deploy'}"
KILLED = (Do.REFUSE, 403, "agent_killed")


@pytest.mark.parametrize(
    ("kills", "admitted", "expected"),
    [
        # The seed's race: the 3rd deploy was admitted by the store, the 4th (on another
        # replica) exceeded and killed the agent before the 3rd's answer came back.
        ([POLICY_KILL], True, (Do.FORWARD, 0, "ok")),
        ([POLICY_KILL], False, KILLED),
        # An operator's kill cuts it, also beside a policy's (exact names match first).
        (["{agent: deployer, by: 'cli:bob'}"], True, KILLED),
        ([POLICY_KILL, "{agent: 'deploy*', by: 'cli:bob'}"], True, KILLED),
        ([POLICY_KILL, "{agent: deployer, by: 'cli:bob'}"], True, KILLED),  # the 2nd exact
    ],
)
def test_a_policy_kill_landing_mid_admit_spares_what_the_store_admitted(
    tmp_path: Path, kills: list[str], admitted: bool, expected: tuple[Do, int, str]
) -> None:
    gate = make(tmp_path)
    rules = tmp_path / "rules"
    (rules / "kill.yaml").write_text(f"kills: [{', '.join(kills)}]\n")
    killed = load_dir(rules)
    spec = gate.specs["deployer"].actions["deploy"][0]

    async def racing_admit(
        agent: str, specs: Sequence[LimitSpec], now: float, amount: float = 1.0
    ) -> Exceeded | None:
        gate.install(killed)  # the watcher applied the kill while Redis answered
        return None if admitted else Exceeded(spec, 3.0, 60.0)

    gate.store.admit = racing_admit  # type: ignore[method-assign]
    out = decide(gate, req("deployer", "d3p", "POST", "deploy.example.com", "/v1/deploy"))
    assert (out.do, out.status, out.decision.reason) == expected
    if expected[0] is Do.REFUSE:
        assert out.fx.auto_kill is None  # already killed: not killed again
