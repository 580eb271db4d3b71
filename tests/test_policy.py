"""Truth table for ``policy.decide``: verdict, stable reason, agent and detail."""

from __future__ import annotations

from pathlib import Path

import pytest

from axme_fw.policy import Decision, Facts, Verdict, decide
from axme_fw.rules import load_dir
from axme_fw.ruleset import Kill, Ruleset, token_digest

TOKENS = {"deployer": "deployer-token", "coder": "coder-token", "deploy-eu": "eu-token"}

RULES = f"""\
version: 1
defaults:
  unknown_agents: {{unknown}}
actions:
  llm:    {{{{hosts: [api.openai.com, api.anthropic.com]}}}}
  openai: {{{{hosts: [api.openai.com]}}}}
  deploy: {{{{hosts: [run.googleapis.com], methods: [POST], paths: ["/v2/projects/*/services"]}}}}
  gh:     {{{{hosts: ["*.github.com"], methods: [GET, HEAD]}}}}
  local:  {{{{hosts: ["localhost:8080"]}}}}
agents:
  deployer:
    token_sha256: {token_digest(TOKENS["deployer"])}
    allow: [llm, openai, deploy]
    addresses: ["deployer.internal:8080"]
  coder:
    token_sha256: {token_digest(TOKENS["coder"])}
    allow: [gh, local]
  deploy-eu:
    token_sha256: {token_digest(TOKENS["deploy-eu"])}
    allow: ["*"]
    limits:
      actions:
        deploy: {{{{max: 3, per: 6h, on_exceed: kill}}}}
  mute:
    token_sha256: {token_digest("mute-token")}
"""

KILLS = {
    "none": "kills: []\n",
    "deployer": "kills: [{agent: deployer, reason: runaway deploys, by: 'cli:alice'}]\n",
    "deployer-park": "kills: [{agent: deployer, mode: park, reason: hold}]\n",
    "glob": "kills: [{agent: 'deploy-*', reason: region down}]\n",
    "all": "kills: [{agent: '*', reason: stop everything}]\n",
}


def load(tmp_path: Path, *, unknown: str = "deny", kills: str = "none") -> Ruleset:
    (tmp_path / "rules.yaml").write_text(RULES.format(unknown=unknown))
    (tmp_path / "kill.yaml").write_text(KILLS[kills])
    return load_dir(tmp_path)


def req(
    user: str | None,
    host: str = "api.openai.com",
    method: str = "POST",
    path: str = "/v1/chat/completions",
    port: int = 443,
    token: str | None = "",
) -> Facts:
    if token == "" and user is not None:
        token = TOKENS.get(user, "whatever")
    return Facts(user, token if user is not None else None, host, port, method, path)


def connect(user: str | None, host: str, port: int = 443) -> Facts:
    return Facts(user, TOKENS.get(user or "", "x") if user else None, host, port, "CONNECT", "")


# -- identity --------------------------------------------------------------------------


def test_no_credentials_is_auth_required(tmp_path: Path) -> None:
    d = decide(load(tmp_path), req(None))
    assert d == Decision(Verdict.AUTH, "auth_required", None, "no proxy credentials")
    assert d.refused


def test_unknown_agent(tmp_path: Path) -> None:
    d = decide(load(tmp_path), req("stranger", token="t"))
    assert d == Decision(Verdict.DENY, "unknown_agent", "stranger", "no such agent")


@pytest.mark.parametrize("token", ["coder-token", "", None, "deployer-token "])
def test_wrong_token_is_unknown_agent(tmp_path: Path, token: str | None) -> None:
    d = decide(load(tmp_path), Facts("deployer", token, "api.openai.com", 443, "GET", "/"))
    assert d == Decision(Verdict.DENY, "unknown_agent", "deployer", "token does not match")


def test_unknown_agents_allow_forwards_unknown_and_anonymous(tmp_path: Path) -> None:
    rules = load(tmp_path, unknown="allow")
    assert decide(rules, req("stranger", host="evil.com", token="t")) == Decision(
        Verdict.FORWARD, "ok", "stranger"
    )
    assert decide(rules, req(None, host="evil.com")) == Decision(Verdict.FORWARD, "ok", "anonymous")


def test_unknown_agents_allow_still_refuses_a_known_agent_with_a_wrong_token(
    tmp_path: Path,
) -> None:
    rules = load(tmp_path, unknown="allow")
    d = decide(rules, req("deployer", token="guess"))
    assert d == Decision(Verdict.DENY, "unknown_agent", "deployer", "token does not match")


def test_identity_comes_before_the_kill_list(tmp_path: Path) -> None:
    rules = load(tmp_path, kills="deployer")
    assert decide(rules, req("deployer", token="bad")).reason == "unknown_agent"
    assert decide(rules, req(None)).reason == "auth_required"


# -- kill list -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kills", "agent", "reason"),
    [
        ("deployer", "deployer", "runaway deploys"),
        ("glob", "deploy-eu", "region down"),
        ("all", "deployer", "stop everything"),
        ("all", "coder", "stop everything"),
    ],
)
def test_killed_agent_is_denied(tmp_path: Path, kills: str, agent: str, reason: str) -> None:
    rules = load(tmp_path, kills=kills)
    d = decide(rules, req(agent))
    assert (d.verdict, d.reason, d.agent, d.detail) == (
        Verdict.DENY,
        "agent_killed",
        agent,
        reason,
    )
    assert d.kill is rules.kills[0]
    assert d.actions == ()
    assert d.inbound is False


@pytest.mark.parametrize(("kills", "agent"), [("deployer", "coder"), ("glob", "deployer")])
def test_kill_does_not_touch_other_agents(tmp_path: Path, kills: str, agent: str) -> None:
    rules = load(tmp_path, kills=kills)
    host = "api.github.com" if agent == "coder" else "api.openai.com"
    d = decide(rules, req(agent, host=host, method="GET"))
    assert (d.verdict, d.reason) == (Verdict.FORWARD, "ok")


def test_kill_comes_before_the_allow_list(tmp_path: Path) -> None:
    d = decide(load(tmp_path, kills="deployer"), req("deployer", host="evil.com"))
    assert d.reason == "agent_killed"


def test_kill_mode_park(tmp_path: Path) -> None:
    rules = load(tmp_path, kills="deployer-park")
    d = decide(rules, req("deployer"))
    assert d == Decision(Verdict.PARK, "agent_killed", "deployer", "hold", rules.kills[0])
    assert d.refused


def test_kill_all_stops_anonymous_when_unknown_agents_are_allowed(tmp_path: Path) -> None:
    rules = load(tmp_path, unknown="allow", kills="all")
    assert decide(rules, req(None)).reason == "agent_killed"
    assert decide(rules, req("stranger", token="t")).reason == "agent_killed"


def test_killed_at_connect_time(tmp_path: Path) -> None:
    rules = load(tmp_path, kills="deployer")
    d = decide(rules, connect("deployer", "api.openai.com"))
    assert (d.verdict, d.reason) == (Verdict.DENY, "agent_killed")


# -- inbound: flows to a killed agent's addresses --------------------------------------


def test_flow_to_a_killed_agents_address_is_refused(tmp_path: Path) -> None:
    rules = load(tmp_path, kills="deployer")
    d = decide(rules, req("coder", host="deployer.internal", port=8080, method="GET", path="/"))
    assert d == Decision(
        Verdict.DENY,
        "agent_killed",
        "coder",
        "destination belongs to killed agent 'deployer'",
        rules.kills[0],
        inbound=True,
    )
    d = decide(rules, connect("coder", "deployer.internal", 8080))
    assert (d.reason, d.agent, d.inbound) == ("agent_killed", "coder", True)


def test_flow_to_a_live_agents_address_goes_to_the_allow_list(tmp_path: Path) -> None:
    rules = load(tmp_path)
    d = decide(rules, req("coder", host="deployer.internal", port=8080, method="GET", path="/"))
    assert d == Decision(
        Verdict.DENY,
        "action_not_allowed",
        "coder",
        "GET deployer.internal/ is not in the allow list",
    )


def test_other_port_of_a_killed_agents_host_is_not_its_address(tmp_path: Path) -> None:
    rules = load(tmp_path, unknown="allow", kills="deployer")
    d = decide(rules, req(None, host="deployer.internal", port=9090))
    assert d == Decision(Verdict.FORWARD, "ok", "anonymous")
    d = decide(rules, req(None, host="deployer.internal", port=8080))
    assert d.reason == "agent_killed"


# -- allow list ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("facts", "verdict", "reason", "detail", "actions"),
    [
        # hosts only: every method and path
        (req("deployer", "api.anthropic.com", "GET", "/v1/models"), "forward", "ok", "", ("llm",)),
        # every allowed action that matches is returned, in allow-list order
        (req("deployer"), "forward", "ok", "", ("llm", "openai")),
        # methods and path globs
        (
            req("deployer", "run.googleapis.com", "POST", "/v2/projects/p1/services"),
            "forward", "ok", "", ("deploy",),
        ),
        (
            req("deployer", "run.googleapis.com", "POST", "/v2/projects/p1/services?validate=1"),
            "forward", "ok", "", ("deploy",),
        ),
        (
            req("deployer", "run.googleapis.com", "GET", "/v2/projects/p1/services"),
            "deny", "action_not_allowed",
            "GET run.googleapis.com/v2/projects/p1/services is not in the allow list", (),
        ),
        (
            req("deployer", "run.googleapis.com", "POST", "/v2/projects/p1/jobs?x=1"),
            "deny", "action_not_allowed",
            "POST run.googleapis.com/v2/projects/p1/jobs is not in the allow list", (),
        ),
        (
            req("deployer", "evil.com", "POST", "/exfil"),
            "deny", "action_not_allowed", "POST evil.com/exfil is not in the allow list", (),
        ),
        # host globs, and a host:port entry
        (req("coder", "api.github.com", "GET", "/repos"), "forward", "ok", "", ("gh",)),
        (
            req("coder", "api.github.com", "POST", "/repos"),
            "deny", "action_not_allowed", "POST api.github.com/repos is not in the allow list", (),
        ),
        (
            req("coder", "github.com", "GET", "/"),
            "deny", "action_not_allowed", "GET github.com/ is not in the allow list", (),
        ),
        (req("coder", "localhost", "PUT", "/x", port=8080), "forward", "ok", "", ("local",)),
        (
            req("coder", "localhost", "PUT", "/x", port=8081),
            "deny", "action_not_allowed", "PUT localhost/x is not in the allow list", (),
        ),
        # CONNECT only knows the host: any action on it admits the tunnel
        (connect("deployer", "run.googleapis.com"), "forward", "ok", "", ("deploy",)),
        (connect("deployer", "api.openai.com"), "forward", "ok", "", ("llm", "openai")),
        (connect("coder", "api.github.com"), "forward", "ok", "", ("gh",)),
        (
            connect("deployer", "evil.com"),
            "deny", "action_not_allowed", "evil.com:443 is not in the allow list", (),
        ),
        (
            connect("coder", "localhost", 8081),
            "deny", "action_not_allowed", "localhost:8081 is not in the allow list", (),
        ),
        # "*" allows everything, and still reports the actions it is limited on
        (req("deploy-eu", "evil.com", "GET", "/"), "forward", "ok", "", ()),
        (
            req("deploy-eu", "run.googleapis.com", "POST", "/v2/projects/p/services"),
            "forward", "ok", "", ("deploy",),
        ),
        (req("deploy-eu", "run.googleapis.com", "GET", "/v2/projects/p/services"),
         "forward", "ok", "", ()),
        (connect("deploy-eu", "run.googleapis.com"), "forward", "ok", "", ()),
        # no allow list at all: nothing is allowed
        (
            Facts("mute", "mute-token", "api.openai.com", 443, "GET", "/"),
            "deny", "action_not_allowed", "GET api.openai.com/ is not in the allow list", (),
        ),
    ],
)  # fmt: skip
def test_allow_list(
    tmp_path: Path,
    facts: Facts,
    verdict: str,
    reason: str,
    detail: str,
    actions: tuple[str, ...],
) -> None:
    d = decide(load(tmp_path), facts)
    assert d == Decision(Verdict(verdict), reason, facts.user, detail, None, actions)
    assert d.refused is (verdict != "forward")


def test_decide_is_pure(tmp_path: Path) -> None:
    rules = load(tmp_path, kills="glob")
    facts = req("deployer")
    assert decide(rules, facts) == decide(rules, facts)
    assert rules.kills == (Kill("deploy-*", "block", "region down", "unknown", ""),)
