"""Hook-level tests of the addon with mitmproxy's taddons/tflow: no network."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from mitmproxy.test import taddons, tflow

from axme_fw import firewall, gate
from axme_fw.answers import DECISION_HEADER
from axme_fw.firewall import Firewall
from axme_fw.identity import parse_proxy_auth
from tests.rig import agents_yaml

BASE = """\
version: 1
actions:
  api: {hosts: [api.example.com], methods: [GET]}
"""


def auth(user: str, token: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()


@pytest.fixture
def fw(tmp_path: Path):
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "base.yaml").write_text(BASE)
    (rules / "agents.yaml").write_text(agents_yaml({"bot": ("t0k", ["api"])}))
    addon = Firewall()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, axme_rules=str(rules), axme_state=str(tmp_path / "state"))
        yield addon
    if addon.audit is not None:
        addon.audit.close()


def request(
    user: str | None = "bot", token: str = "t0k", host: str = "api.example.com", method: str = "GET"
):
    f = tflow.tflow()
    f.request.host = host
    f.request.method = method
    if user is not None:
        f.request.headers["Proxy-Authorization"] = auth(user, token)
    f.request.headers["X-Agent-Instance"] = "pod-7"
    return f


def test_allowed_request_is_forwarded_without_credentials_or_instance_header(fw) -> None:
    f = request()
    fw.requestheaders(f)
    assert f.response is None
    assert "Proxy-Authorization" not in f.request.headers
    assert "X-Agent-Instance" not in f.request.headers
    assert f.metadata[firewall.META_AGENT] == "bot"


@pytest.mark.parametrize(
    ("user", "token", "host", "method", "status", "reason"),
    [
        (None, "", "api.example.com", "GET", 407, "auth_required"),
        ("bot", "nope", "api.example.com", "GET", 403, "unknown_agent"),
        ("ghost", "t0k", "api.example.com", "GET", 403, "unknown_agent"),
        ("bot", "t0k", "evil.example.com", "GET", 403, "action_not_allowed"),
        ("bot", "t0k", "api.example.com", "POST", 403, "action_not_allowed"),
    ],
)
def test_refusals(fw, user, token, host, method, status, reason) -> None:
    f = request(user, token, host, method)
    fw.requestheaders(f)
    assert f.response is not None
    assert f.response.status_code == status
    assert f.response.headers[DECISION_HEADER] == reason
    body = json.loads(f.response.content or b"")
    assert body["error"] == reason
    assert set(body) == {"error", "agent", "reason", "by", "at"}
    if status == 407:
        assert f.response.headers["Proxy-Authenticate"].startswith("Basic")


def test_exception_in_decision_refuses_never_forwards(fw, monkeypatch) -> None:
    def boom(*_a, **_k):
        raise RuntimeError("bug in the decision path")

    monkeypatch.setattr(gate, "decide", boom)
    for hook in (fw.requestheaders, fw.http_connect):
        f = request()
        hook(f)
        assert f.response is not None, hook.__name__
        assert f.response.status_code == 403
        assert f.response.headers[DECISION_HEADER] == "internal_error"


def test_exception_while_parsing_credentials_refuses(fw, monkeypatch) -> None:
    monkeypatch.setattr(gate, "parse_proxy_auth", lambda _v: 1 / 0)
    f = request()
    fw.requestheaders(f)
    assert f.response is not None and f.response.status_code == 403


def test_connect_remembers_credentials_for_requests_inside_the_tunnel(fw) -> None:
    connect = request()
    connect.request.method = "CONNECT"
    connect.request.port = 443
    fw.http_connect(connect)
    assert connect.response is None
    connect.client_conn.sni = "api.example.com"  # TLS inside the tunnel, as a client sends it
    inner = tflow.tflow(client_conn=connect.client_conn)
    inner.request.host, inner.request.port = "api.example.com", 443
    fw.requestheaders(inner)
    assert inner.response is None
    assert inner.metadata[firewall.META_AGENT] == "bot"


def test_connect_by_unknown_agent_gets_no_tunnel(fw) -> None:
    connect = request("ghost")
    connect.request.method = "CONNECT"
    fw.http_connect(connect)
    assert connect.response is not None and connect.response.status_code == 403


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (auth("a", "b"), ("a", "b")),
        (auth("a", "b:c"), ("a", "b:c")),
        ("Bearer xyz", None),
        ("Basic !!!", None),
        ("Basic " + base64.b64encode(b"nocolon").decode(), None),
        ("Basic " + base64.b64encode(b":pw").decode(), None),
    ],
)
def test_parse_proxy_auth(value: str, expected) -> None:
    assert parse_proxy_auth(value) == expected


def test_invalid_rules_at_start_refuse_to_start_and_nothing_is_allowed(tmp_path: Path) -> None:
    from mitmproxy import exceptions

    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "bad.yaml").write_text("agents: [\n")
    addon = Firewall()
    with taddons.context(addon) as tctx:
        with pytest.raises(exceptions.OptionsError, match="YAML syntax error"):
            tctx.configure(addon, axme_rules=str(rules), axme_state=str(tmp_path / "state"))
        f = request()
        addon.requestheaders(f)
        assert f.response is not None and f.response.status_code == 403
    if addon.audit is not None:
        addon.audit.close()


def test_a_revoked_token_is_refused_after_reload_despite_the_credential_cache(
    fw, tmp_path: Path
) -> None:
    f = request()
    fw.requestheaders(f)
    assert f.response is None  # verified, and now remembered
    rules = tmp_path / "rules"
    (rules / "agents.yaml").write_text(agents_yaml({"bot": ("n3w-t0k", ["api"])}))
    fw._install(fw.loader.load())
    f = request()
    fw.requestheaders(f)
    assert f.response is not None and f.response.status_code == 403
    g = request(token="n3w-t0k")
    fw.requestheaders(g)
    assert g.response is None


def test_report_mode_forwards_what_it_would_refuse_but_never_a_kill(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "base.yaml").write_text(BASE + "defaults: {mode: report, audit: {decisions: all}}\n")
    (rules / "agents.yaml").write_text(agents_yaml({"bot": ("t0k", ["api"])}))
    addon = Firewall()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, axme_rules=str(rules), axme_state=str(tmp_path / "state"))
        f = request(host="elsewhere.example.com")  # not in the allow list
        addon.requestheaders(f)
        assert f.response is None  # forwarded, audited as would_deny
        ctrl = request(token="wrong", host="axme-fw.local")
        addon.requestheaders(ctrl)  # the control host never forwards, report mode or not
        assert ctrl.response is not None and ctrl.response.status_code == 403
        (rules / "kill.yaml").write_text("kills: [{agent: bot, reason: stop}]\n")
        assert addon.loader is not None
        addon._install(addon.loader.load())
        k = request()
        addon.requestheaders(k)
        assert k.response is not None and k.response.status_code == 403
    assert addon.audit is not None
    addon.audit.close()
    lines = (tmp_path / "state" / "audit.jsonl").read_text()
    assert '"verdict":"would_deny"' in lines and '"reason":"action_not_allowed"' in lines
