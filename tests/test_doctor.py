"""``axme-fw doctor``: the pure checks as truth tables, then the CLI against a real proxy.

The end-to-end cases run the CLI as a subprocess with an agent's environment built the
way a container would have it: proxy variables, CA variables, and a PATH holding curl
and a stand-in ``node`` that reports a chosen version (the machine's own Node is 20,
which doctor rightly fails).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from axme_fw import doctor
from axme_fw.doctor import Check, Proxy, Reply

from .rig import AXME_FW, Upstream, agents_yaml, free_port, make_rules, start_proxy, start_upstream
from .rig import Proxy as RigProxy

TOKEN = "doctor-token-s3cret"

# ---------------------------------------------------------------- pure


@pytest.mark.parametrize(
    ("url", "want"),
    [
        ("http://bot:tok@10.0.0.1:8080", Proxy("10.0.0.1", 8080, "bot", "tok")),
        ("http://bot:t%40k@fw:3128", Proxy("fw", 3128, "bot", "t@k")),
        ("fw:8080", Proxy("fw", 8080, None, None)),
        ("https://fw:8080", None),
        ("http://:8080", None),
    ],
)
def test_parse_proxy(url: str, want: Proxy | None) -> None:
    assert doctor.parse_proxy(url) == want


def test_proxy_shown_masks_the_password() -> None:
    p = Proxy("fw", 8080, "bot", "tok")
    assert p.shown == "http://bot:***@fw:8080"
    assert "tok" not in p.shown


URL = "http://bot:tok@fw:8080"


@pytest.mark.parametrize(
    ("env", "status", "detail"),
    [
        ({}, "fail", "none of HTTP_PROXY, HTTPS_PROXY, http_proxy, https_proxy"),
        (
            {"HTTP_PROXY": URL, "HTTPS_PROXY": URL, "https_proxy": URL},
            "fail",
            "missing http_proxy (curl reads only the lower-case http_proxy)",
        ),
        (
            {
                "HTTP_PROXY": URL,
                "HTTPS_PROXY": URL,
                "http_proxy": URL,
                "https_proxy": "http://x:y@fw:9",
            },
            "fail",
            "they differ: HTTP_PROXY=http://bot:***@fw:8080, HTTPS_PROXY=http://bot:***@fw:8080, "
            "http_proxy=http://bot:***@fw:8080, https_proxy=http://x:***@fw:9",
        ),
        (
            {"HTTP_PROXY": "socks5://fw:1080", "HTTPS_PROXY": URL},
            "fail",
            "HTTP_PROXY: not an http://HOST:PORT URL",
        ),
        (dict.fromkeys(doctor.PROXY_VARS, URL), "pass", "all four set to http://bot:***@fw:8080"),
    ],
)
def test_check_proxy_vars(env: dict[str, str], status: str, detail: str) -> None:
    check, _ = doctor.check_proxy_vars(env)
    assert (check.status, check.detail) == (status, detail)
    assert "tok" not in check.detail and "tok" not in check.fix
    if status == "fail":
        assert check.fix


NODE_ENV = {"NODE_USE_ENV_PROXY": "1", "NODE_EXTRA_CA_CERTS": "/ca.pem"}


@pytest.mark.parametrize(
    ("version", "env", "status", "detail"),
    [
        (None, {}, "pass", "not installed (nothing to check)"),
        ("v20.20.2", NODE_ENV, "fail", "v20.20.2 ignores NODE_USE_ENV_PROXY: it goes direct"),
        ("v22.20.0", NODE_ENV, "fail", "v22.20.0 ignores NODE_USE_ENV_PROXY: it goes direct"),
        (
            "v22.21.0",
            NODE_ENV,
            "pass",
            "v22.21.0 with NODE_USE_ENV_PROXY=1 and NODE_EXTRA_CA_CERTS",
        ),
        ("v23.11.1", NODE_ENV, "fail", "v23.11.1 ignores NODE_USE_ENV_PROXY: it goes direct"),
        ("v24.4.1", NODE_ENV, "fail", "v24.4.1 ignores NODE_USE_ENV_PROXY: it goes direct"),
        ("v24.5.0", NODE_ENV, "pass", "v24.5.0 with NODE_USE_ENV_PROXY=1 and NODE_EXTRA_CA_CERTS"),
        ("v25.1.0", NODE_ENV, "pass", "v25.1.0 with NODE_USE_ENV_PROXY=1 and NODE_EXTRA_CA_CERTS"),
        (
            "v24.5.0",
            {"NODE_EXTRA_CA_CERTS": "/ca.pem"},
            "fail",
            "v24.5.0, but NODE_USE_ENV_PROXY is not 1: Node ignores the proxy variables",
        ),
        (
            "v24.5.0",
            {"NODE_USE_ENV_PROXY": "1"},
            "fail",
            "v24.5.0 with NODE_USE_ENV_PROXY=1, but NODE_EXTRA_CA_CERTS is not set",
        ),
        ("garbage", NODE_ENV, "fail", "unreadable `node --version`: 'garbage'"),
    ],
)
def test_check_node(version: str | None, env: dict[str, str], status: str, detail: str) -> None:
    check = doctor.check_node(version, env)
    assert (check.status, check.detail) == (status, detail)


@pytest.mark.parametrize(
    ("host", "entry", "covered"),
    [
        ("api.openai.com", "*", True),
        ("api.openai.com", "openai.com", True),
        ("api.openai.com", ".openai.com", True),
        ("api.openai.com", "*.openai.com", True),
        ("api.openai.com", "api.openai.com:443", True),
        ("notopenai.com", "openai.com", False),
        ("axme-fw.local", "localhost", False),
        ("127.0.0.1", "127.0.0.1", True),
    ],
)
def test_covered_by(host: str, entry: str, covered: bool) -> None:
    assert doctor.covered_by(host, entry) is covered


def test_check_no_proxy() -> None:
    ok = doctor.check_no_proxy({"NO_PROXY": "localhost, 127.0.0.1"}, ["api.openai.com"], True)
    assert ok == Check("NO_PROXY", "pass", "127.0.0.1,localhost: covers none of the rules' hosts")
    bad = doctor.check_no_proxy(
        {"NO_PROXY": "localhost", "no_proxy": ".githubusercontent.com"},
        ["*.githubusercontent.com", "127.0.0.1:8443"],
        True,
    )
    assert bad.status == "fail"
    assert bad.detail == "'.githubusercontent.com' sends *.githubusercontent.com direct"
    assert (
        bad.fix == "export NO_PROXY='localhost' no_proxy=$NO_PROXY (drop what the proxy must see)"
    )
    port = doctor.check_no_proxy({"NO_PROXY": "127.0.0.1"}, ["127.0.0.1:8443"], True)
    assert port.detail == "'127.0.0.1' sends 127.0.0.1:8443 direct"
    control = doctor.check_no_proxy({"no_proxy": ".local"}, [], False)
    assert control.detail == "'.local' sends axme-fw.local direct"


P = Proxy("fw", 8080, "bot", "pw-s3cr3t")


@pytest.mark.parametrize(
    ("reply", "status", "detail"),
    [
        (Reply(None, error="refused"), "fail", "no answer from the proxy: refused"),
        (Reply(407), "fail", "the proxy asks for credentials (407)"),
        (
            Reply(403, {"error": "unknown_agent"}, "unknown_agent"),
            "fail",
            "the proxy does not accept 'bot' with this token (403 unknown_agent)",
        ),
        (
            Reply(200, {"hello": 1}),
            "fail",
            "http://axme-fw.local/status answered 200, not axme-fw's status",
        ),
        (Reply(200, {"agent": "other"}), "fail", "the credentials identify 'other', not 'bot'"),
        (
            Reply(200, {"agent": "bot", "state": "active", "kill": None}),
            "pass",
            "the proxy knows this agent as 'bot', state active",
        ),
        (
            Reply(200, {"agent": "bot", "state": "killed", "kill": {"reason": "r", "by": "cli:a"}}),
            "pass",
            "the proxy knows this agent as 'bot', state killed (r, by cli:a)",
        ),
    ],
)
def test_check_identity(reply: Reply, status: str, detail: str) -> None:
    check = doctor.check_identity(reply, P, "bot")
    assert (check.status, check.detail) == (status, detail)
    assert "pw-s3cr3t" not in check.detail + check.fix


def test_check_direct() -> None:
    through = doctor.check_direct([("a:1", "refused"), ("b:2", None)], True)
    assert through.status == "fail"
    assert through.detail == "connected straight to b:2, bypassing the proxy"
    blocked = doctor.check_direct([("a:1", "timed out")], True)
    assert blocked == Check("direct connection", "pass", "blocked: a:1: timed out")


def test_render_marks_and_fixes() -> None:
    text = doctor.render([Check("a", "pass", "fine"), Check("bb", "fail", "broken", "do x")])
    assert text.splitlines() == [
        "✓ a   fine",
        "✗ bb  broken",
        "      fix: do x",
        "1 check(s) failed",
    ]


# ---------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def wired(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RigProxy, Upstream, Path]]:
    tmp = tmp_path_factory.mktemp("doctor")
    rules = make_rules(
        tmp / "rules",
        defaults="version: 1\nactions:\n  llm: {hosts: [api.openai.com]}\n"
        "  gh: {hosts: ['*.githubusercontent.com']}\n",
        agents=agents_yaml({"bot": (TOKEN, ["llm", "gh"])}),
    )
    proxy = start_proxy(rules, tmp / "state")
    up = start_upstream()
    try:
        yield proxy, up, tmp
    finally:
        proxy.stop()
        up.server.shutdown()


def agent_bin(directory: Path, node_version: str | None) -> Path:
    """A PATH directory with curl and (optionally) a ``node`` printing ``node_version``."""
    directory.mkdir(exist_ok=True)
    curl = shutil.which("curl")
    assert curl is not None, "curl is needed for these tests"
    if not (directory / "curl").exists():
        (directory / "curl").symlink_to(curl)
    node = directory / "node"
    if node_version is None:
        node.unlink(missing_ok=True)
    else:
        node.write_text(f"#!/bin/sh\necho {node_version}\n")
        node.chmod(0o755)
    return directory


def doctor_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [AXME_FW, "doctor", *args], env=env, capture_output=True, text=True, timeout=60
    )


def good_env(proxy: RigProxy, tmp: Path, node: str | None = "v24.5.0") -> dict[str, str]:
    env = proxy.env("bot", TOKEN)
    env.update(
        PATH=str(agent_bin(tmp / f"bin-{node}", node)),
        NO_PROXY="localhost,127.0.0.1",
        no_proxy="localhost,127.0.0.1",
        NODE_USE_ENV_PROXY="1",
        NODE_EXTRA_CA_CERTS=str(proxy.ca),
    )
    return env


def test_doctor_passes_in_a_wired_environment(wired: tuple[RigProxy, Upstream, Path]) -> None:
    proxy, _, tmp = wired
    closed = f"127.0.0.1:{free_port()}"  # nothing listens: stands for a blocked canary
    res = doctor_cli(good_env(proxy, tmp), "--agent", "bot", "--rules", str(proxy.rules),
                     "--canary", closed, "--json")  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    report = json.loads(res.stdout)
    assert report["ok"] is True
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert statuses == dict.fromkeys(
        [
            "proxy variables",
            "proxy reachable",
            "identity",
            "python ssl trust",
            "python requests trust",
            "node.js",
            "curl",
            "NO_PROXY",
            "direct connection",
        ],
        "pass",
    )
    detail = {c["name"]: c["detail"] for c in report["checks"]}
    assert detail["NO_PROXY"] == "127.0.0.1,localhost: covers none of the rules' hosts"
    assert detail["direct connection"] == f"blocked: {closed}: refused"
    assert TOKEN not in res.stdout + res.stderr
    # Without node on PATH there is nothing to check there; the text form ends in a verdict.
    res = doctor_cli(good_env(proxy, tmp, node=None), "--canary", closed)
    assert res.returncode == 0, res.stdout
    assert "✓ node.js" in res.stdout and "not installed" in res.stdout
    assert res.stdout.rstrip().endswith("all checks passed")


def test_doctor_fails_with_fixes_when_miswired(wired: tuple[RigProxy, Upstream, Path]) -> None:
    proxy, up, tmp = wired
    env = good_env(proxy, tmp, node="v20.20.2")
    env.pop("http_proxy")
    env.update(NO_PROXY="localhost,.openai.com", no_proxy="localhost,.openai.com")
    res = doctor_cli(env, "--agent", "bot", "--rules", str(proxy.rules),
                     "--canary", f"127.0.0.1:{up.port}")  # fmt: skip
    assert res.returncode == 1
    out = res.stdout
    assert "✗ proxy variables" in out and "missing http_proxy" in out
    assert "✓ identity" in out  # HTTPS_PROXY and HTTP_PROXY still work for Python
    assert "✗ node.js" in out and "v20.20.2 ignores NODE_USE_ENV_PROXY" in out
    assert "✗ curl" in out  # curl reads only the lower-case http_proxy
    assert "✗ NO_PROXY" in out and "'.openai.com' sends api.openai.com direct" in out
    assert "✗ direct connection" in out
    assert f"connected straight to 127.0.0.1:{up.port}, bypassing the proxy" in out
    assert out.count("fix: ") == 5
    assert out.rstrip().endswith("5 check(s) failed")
    assert TOKEN not in out + res.stderr


def test_doctor_fails_on_wrong_token_and_untrusted_ca(
    wired: tuple[RigProxy, Upstream, Path],
) -> None:
    proxy, _, tmp = wired
    env = good_env(proxy, tmp)
    wrong = proxy.url("bot", "not-the-token")
    env.update(dict.fromkeys(doctor.PROXY_VARS, wrong))
    res = doctor_cli(env, "--json")
    assert res.returncode == 1
    checks = {c["name"]: c for c in json.loads(res.stdout)["checks"]}
    assert checks["identity"]["status"] == "fail"
    assert "403 unknown_agent" in checks["identity"]["detail"]
    assert checks["python ssl trust"]["status"] == "skip"
    # Right token, but the process trusts the system store and certifi, not the firewall.
    env = good_env(proxy, tmp)
    for var in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        env.pop(var)
    res = doctor_cli(env, "--json")
    assert res.returncode == 1
    checks = {c["name"]: c for c in json.loads(res.stdout)["checks"]}
    assert checks["identity"]["status"] == "pass"
    for name in ("python ssl trust", "python requests trust"):
        assert checks[name]["status"] == "fail", checks[name]
        assert "certificate not trusted" in checks[name]["detail"]
    assert checks["python requests trust"]["detail"].startswith(
        "certifi (REQUESTS_CA_BUNDLE unset)"
    )
    assert "REQUESTS_CA_BUNDLE=" in checks["python requests trust"]["fix"]


def test_doctor_when_the_proxy_is_down(tmp_path: Path) -> None:
    url = f"http://bot:{TOKEN}@127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(dict.fromkeys(doctor.PROXY_VARS, url))
    env["PATH"] = str(agent_bin(tmp_path / "bin", None))
    res = doctor_cli(env)
    assert res.returncode == 1
    lines = res.stdout.splitlines()
    assert lines[1].startswith("✗ proxy reachable") and lines[1].endswith(": refused")
    assert any(line.startswith("- identity") for line in lines)
    assert TOKEN not in res.stdout


def test_doctor_usage_error() -> None:
    res = doctor_cli(dict(os.environ), "--canary", "no-port")
    assert res.returncode == 2
    assert res.stderr.strip() == "axme-fw: --canary 'no-port': expected HOST:PORT"
