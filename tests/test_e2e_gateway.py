"""End to end: a real `axme-fw run`, real upstreams on 127.0.0.1, real clients via env vars."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest
import requests
import yaml

from tests.rig import (
    AXME_FW,
    Proxy,
    Upstream,
    agents_yaml,
    first_after,
    free_port,
    replace_file,
    saw_status,
    start_proxy,
    start_upstream,
    token_hash,
    upstream_ca,
    wait_for,
)

DEPLOYER, DTOKEN = "deployer", "tok-deployer-1"
CODER, CTOKEN = "coder", "tok-coder-1"

BASE = """\
version: 1
defaults:
  audit: {decisions: denied}
actions:
  local: {hosts: ["127.0.0.1"]}
  readonly: {hosts: ["127.0.0.1"], methods: [GET]}
"""
AGENTS = agents_yaml({DEPLOYER: (DTOKEN, ["local"]), CODER: (CTOKEN, ["readonly"])})


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proxy, Upstream, Upstream]]:
    tmp = tmp_path_factory.mktemp("gw")
    _ca, server_ctx, ca_pem = upstream_ca(tmp)
    plain, tls = start_upstream(), start_upstream(server_ctx)
    rules = tmp / "rules"
    rules.mkdir()
    (rules / "base.yaml").write_text(BASE)
    (rules / "agents.yaml").write_text(AGENTS)
    proxy = start_proxy(rules, tmp / "state", ca_pem)
    yield proxy, plain, tls
    proxy.stop()
    plain.server.shutdown()
    tls.server.shutdown()


def get(
    proxy: Proxy, agent: str | None, token: str | None, url: str, method: str = "GET"
) -> requests.Response:
    return proxy.session(agent, token).request(method, url, timeout=10)


def curl(
    proxy: Proxy, agent: str | None, token: str | None, url: str
) -> tuple[int, dict[str, str], str]:
    """Run the real curl with only proxy environment variables; (status, headers, body)."""
    res = subprocess.run(
        [
            "curl",
            "-s",
            "--max-time",
            "10",
            "-D",
            "-",
            "-o",
            "/dev/stderr",
            "-w",
            "%{http_code}",
            url,
        ],
        env=proxy.env(agent, token),
        capture_output=True,
        text=True,
        timeout=20,
    )
    *blocks, code = res.stdout.split("\n\n")  # text mode turned CRLF into LF
    # Through a CONNECT tunnel curl prints the proxy's "200 Connection established" first.
    lines = blocks[-1].split("\n") if blocks else []
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    return int(code), headers, res.stderr


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_curl_requests_httpx_get_200_through_env_proxy(world, scheme: str) -> None:
    proxy, plain, tls = world
    up = plain if scheme == "http" else tls
    url = f"{up.url}/hello"
    status, _, body = curl(proxy, DEPLOYER, DTOKEN, url)
    assert status == 200, body

    for lib in ("requests", "httpx"):  # each in its own process, configured by env alone
        code = f"import {lib},sys; print({lib}.get(sys.argv[1], timeout=10).status_code)"
        out = subprocess.run(
            [sys.executable, "-c", code, url],
            env=proxy.env(DEPLOYER, DTOKEN),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.stdout.strip() == "200", (lib, out.stderr)

    # Credentials are stripped before forwarding: upstream never sees them.
    hello = [s for s in up.seen if s.path == "/hello"]
    assert len(hello) == 3
    for seen in hello:
        assert "proxy-authorization" not in seen.headers
        assert DTOKEN not in json.dumps(seen.headers)


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_wrong_token_403_no_token_407(world, scheme: str) -> None:
    proxy, plain, tls = world
    up = plain if scheme == "http" else tls
    before = len(up.seen)
    if scheme == "http":
        r = get(proxy, DEPLOYER, "wrong", f"{up.url}/x")
        assert r.status_code == 403
        assert r.headers["X-Axme-Fw-Decision"] == "unknown_agent"
        assert r.json()["error"] == "unknown_agent"
        status, headers, _ = curl(proxy, None, None, f"{up.url}/x")
        assert status == 407
        assert headers["proxy-authenticate"].startswith("Basic")
    else:  # refused at CONNECT: clients see a proxy error, and nothing is tunnelled
        with pytest.raises(requests.exceptions.ProxyError, match="403"):
            get(proxy, DEPLOYER, "wrong", f"{up.url}/x")
        with pytest.raises(requests.exceptions.ProxyError, match="407"):
            get(proxy, None, None, f"{up.url}/x")
    assert len(up.seen) == before
    # The token never reaches the audit log.
    assert "wrong" not in (proxy.state / "audit.jsonl").read_text().replace("wrong_", "")


def test_outside_allow_list_is_403_with_reason(world) -> None:
    proxy, plain, tls = world
    r = get(proxy, CODER, CTOKEN, f"{plain.url}/r")
    assert r.status_code == 200
    for up in (plain, tls):
        before = len(up.seen)
        r = get(proxy, CODER, CTOKEN, f"{up.url}/w", method="POST")  # readonly: GET only
        assert r.status_code == 403
        body = r.json()
        assert body["error"] == "action_not_allowed"
        assert body["agent"] == CODER
        assert "POST 127.0.0.1/w" in body["reason"]
        assert r.headers["X-Axme-Fw-Decision"] == "action_not_allowed"
        assert len(up.seen) == before
    # A host no action allows ("localhost" is not "127.0.0.1").
    r = get(proxy, DEPLOYER, DTOKEN, f"http://localhost:{plain.port}/r")
    assert r.status_code == 403 and r.json()["error"] == "action_not_allowed"


def test_kill_reaches_every_instance_and_resume_restores(world, tmp_path: Path) -> None:
    proxy, plain, tls = world
    stop = tmp_path / "stop"
    workers = []
    for i in range(4):
        out = tmp_path / f"deployer-{i}.jsonl"
        url = f"{(tls if i % 2 else plain).url}/work"
        workers.append(
            (
                out,
                subprocess.Popen(
                    [
                        sys.executable,
                        str(Path(__file__).parent / "worker.py"),
                        str(out),
                        url,
                        str(stop),
                        "40",
                    ],
                    env=proxy.env(DEPLOYER, DTOKEN),
                ),
            )
        )
    other_out = tmp_path / "coder.jsonl"
    other = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).parent / "worker.py"),
            str(other_out),
            f"{tls.url}/c",
            str(stop),
            "40",
        ],
        env=proxy.env(CODER, CTOKEN),
    )
    try:
        # Every instance is up and getting 200 before the kill.
        for out, _ in workers:
            wait_for(partial(saw_status, out, 200), 20, f"{out.name} 200")
        wait_for(partial(saw_status, other_out, 200), 20, "coder 200")

        res = proxy.cli("kill", DEPLOYER, "--reason", "runaway deploys")
        assert "enforced by the proxy" in res.stdout
        killed_at = time.time()
        for out, _ in workers:
            rec = wait_for(partial(first_after, out, killed_at), 10, f"{out.name} after kill")
            assert rec["status"] == 403, rec
            assert rec["decision"] == "agent_killed"
            assert rec["body"]["error"] == "agent_killed"
            assert rec["body"]["reason"] == "runaway deploys"
            assert rec["body"]["by"].startswith("cli:")
        # The other agent keeps going.
        rec = wait_for(lambda: first_after(other_out, killed_at), 10, "coder request after kill")
        assert rec["status"] == 200

        proxy.cli("resume", DEPLOYER, "--reason", "fixed")
        resumed_at = time.time()
        for out, _ in workers:
            rec = wait_for(partial(first_after, out, resumed_at), 10, f"{out.name} after resume")
            assert rec["status"] == 200, rec
    finally:
        stop.touch()
        for _, p in [*workers, (other_out, other)]:
            p.wait(20)
    events = [r["event"] for r in proxy.audit() if r.get("agent") == DEPLOYER]
    assert "agent.killed" in events and "agent.resumed" in events


def test_status_json_shows_kill_and_who(world) -> None:
    proxy, _plain, _tls = world
    proxy.cli("kill", "deploy*", "--reason", "glob")
    try:
        out = json.loads(proxy.cli("status", "--json").stdout)
        row = next(r for r in out["agents"] if r["agent"] == DEPLOYER)
        assert (
            row["state"] == "killed"
            and row["reason"] == "glob"
            and row["kill_pattern"] == "deploy*"
        )
        assert row["by"].startswith("cli:")
        assert next(r for r in out["agents"] if r["agent"] == CODER)["state"] == "active"
        assert out["proxy"]["in_sync"] is True
    finally:
        proxy.cli("resume", "deploy*")


def test_broken_edit_keeps_old_rules_and_is_audited_then_valid_edits_apply(world) -> None:
    proxy, plain, _tls = world
    agents = proxy.rules / "agents.yaml"
    url = f"{plain.url}/edit"
    assert get(proxy, CODER, CTOKEN, url).status_code == 200
    rejected = len(proxy.audit_events("rules.rejected"))

    replace_file(agents, AGENTS + "  coder: [oops\n")  # YAML syntax error
    wait_for(lambda: len(proxy.audit_events("rules.rejected")) > rejected, 10, "rules.rejected")
    rec = proxy.audit_events("rules.rejected")[-1]
    assert any("agents.yaml" in e and "YAML syntax error" in e for e in rec["errors"])
    assert get(proxy, CODER, CTOKEN, url).status_code == 200  # last good rules still in force

    # Valid edits in three ways editors and operators save files: rename, cp, mv.
    no_coder = agents_yaml({DEPLOYER: (DTOKEN, ["local"]), CODER: (CTOKEN, [])})
    replace_file(agents, no_coder)
    wait_for(lambda: get(proxy, CODER, CTOKEN, url).status_code == 403, 5, "rename edit to apply")

    src = proxy.rules.parent / "agents.src"
    src.write_text(AGENTS)
    subprocess.run(["cp", str(src), str(agents)], check=True)
    wait_for(lambda: get(proxy, CODER, CTOKEN, url).status_code == 200, 5, "cp edit to apply")

    src.write_text(no_coder)
    subprocess.run(["mv", str(src), str(agents)], check=True)
    wait_for(lambda: get(proxy, CODER, CTOKEN, url).status_code == 403, 5, "mv edit to apply")

    # A keep-alive session sees the change on its open connection.
    s = requests.Session()
    s.trust_env = False
    s.proxies = {"http": proxy.url(CODER, CTOKEN)}
    assert s.get(url, timeout=10).status_code == 403
    replace_file(agents, AGENTS)
    wait_for(
        lambda: s.get(url, timeout=10).status_code == 200,
        5,
        "keep-alive connection to see the edit",
    )


def test_audit_verify_passes_then_fails_after_an_edit(world, tmp_path: Path) -> None:
    proxy, _plain, _tls = world
    res = proxy.cli("audit", "verify")
    assert "intact" in res.stdout
    # Verify a copy, so the shared proxy keeps a good log.
    state = tmp_path / "state"
    state.mkdir()
    lines = (proxy.state / "audit.jsonl").read_text().splitlines(keepends=True)
    assert len(lines) >= 3
    (state / "audit.head").write_text((proxy.state / "audit.head").read_text())
    lines[1] = lines[1].replace('"event":', '"event" :', 1)
    (state / "audit.jsonl").write_text("".join(lines))
    bad = subprocess.run(
        [AXME_FW, "audit", "verify", "--state", str(state)], capture_output=True, text=True
    )
    assert bad.returncode == 1
    assert bad.stderr.strip().endswith(
        f"{state / 'audit.jsonl'}:2: line 2 was changed (line 3 records another hash)"
    )


def test_audit_cli_filters_by_agent_and_json(world) -> None:
    proxy, _plain, _tls = world
    out = proxy.cli("audit", "--agent", DEPLOYER, "--json").stdout.splitlines()
    recs = [json.loads(x) for x in out]
    assert recs and all(r["agent"] == DEPLOYER for r in recs)
    text = proxy.cli("audit", "--agent", DEPLOYER).stdout
    assert "agent.killed" in text


def test_httpx_keepalive_client_sees_kill_inside_tunnel(world) -> None:
    proxy, _plain, tls = world
    with httpx.Client(
        proxy=proxy.url(DEPLOYER, DTOKEN), verify=proxy.ssl_context(), trust_env=False
    ) as c:
        assert c.get(f"{tls.url}/a").status_code == 200
        proxy.cli("kill", DEPLOYER, "--reason", "inside tunnel")
        try:
            r = c.get(f"{tls.url}/b")
            assert r.status_code == 403
            assert r.json()["error"] == "agent_killed"
        finally:
            proxy.cli("resume", DEPLOYER)
        assert c.get(f"{tls.url}/c").status_code == 200


def test_a_broken_kill_file_is_refused_and_the_last_good_kill_list_stays(world) -> None:
    proxy, plain, _tls = world
    url = f"{plain.url}/kf"
    proxy.cli("kill", DEPLOYER, "--reason", "before the break")
    kill_file = proxy.rules / "kill.yaml"
    good = kill_file.read_text()
    rejected = len(proxy.audit_events("rules.rejected"))
    try:
        replace_file(kill_file, "kills:\n  - agent: [deployer\n")
        wait_for(lambda: len(proxy.audit_events("rules.rejected")) > rejected, 10, "rejection")
        r = get(proxy, DEPLOYER, DTOKEN, url)
        assert r.status_code == 403 and r.json()["reason"] == "before the break"
        # The CLI refuses to rewrite a kill list it cannot read, and says where.
        res = proxy.cli("resume", DEPLOYER, check=False)
        assert res.returncode == 1
        assert f"{kill_file}:" in res.stderr
    finally:
        replace_file(kill_file, good)
        proxy.cli("resume", DEPLOYER)
    assert get(proxy, DEPLOYER, DTOKEN, url).status_code == 200


def test_20_concurrent_cli_kills_lose_nothing_and_keep_one_audit_chain(tmp_path: Path) -> None:
    rules, state = tmp_path / "rules", tmp_path / "state"
    rules.mkdir()
    state.mkdir()  # a missing state directory is an error (test_e2e_hostile)
    (rules / "base.yaml").write_text(BASE)
    env = {k: v for k, v in os.environ.items() if k not in ("AXME_FW_RULES", "AXME_FW_STATE")}
    procs = [
        subprocess.Popen(
            [
                AXME_FW,
                "kill",
                f"bot-{i}",
                "--reason",
                f"r{i}",
                "--no-wait",
                "--rules",
                str(rules),
                "--state",
                str(state),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        for i in range(20)
    ]
    for p in procs:
        _out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        assert b"warning: no agent" in err  # unknown names are allowed, and said so
    data = yaml.safe_load((rules / "kill.yaml").read_text())
    assert data["revision"] == 20
    assert sorted(k["agent"] for k in data["kills"]) == sorted(f"bot-{i}" for i in range(20))
    res = subprocess.run(
        [AXME_FW, "audit", "verify", "--state", str(state)], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr
    assert "20 records" in res.stdout


def test_agent_add_prints_a_token_once_and_the_proxy_accepts_it(world) -> None:
    proxy, plain, tls = world
    res = proxy.cli("agent", "add", "newbie", "--allow", "local")
    token = res.stdout.strip()
    assert len(token) >= 32 and "token (shown once" in res.stderr
    generated = (proxy.rules / "agents.generated.yaml").read_text()
    assert token not in generated and token_hash(token) in generated
    wait_for(
        lambda: get(proxy, "newbie", token, f"{plain.url}/new").status_code == 200,
        5,
        "the new agent to be accepted",
    )
    assert get(proxy, "newbie", "guess", f"{plain.url}/new").status_code == 403
    again = proxy.cli("agent", "add", "newbie", check=False)
    assert again.returncode == 1 and "already exists" in again.stderr
    env_lines = proxy.cli("env", "newbie", "--token", token, "--proxy", f"127.0.0.1:{proxy.port}")
    exports = dict(
        line.removeprefix("export ").split("=", 1)
        for line in env_lines.stdout.splitlines()
        if not line.startswith("#")  # comments say why NO_PROXY is what it is
    )
    assert exports["HTTPS_PROXY"].strip("'\"") == proxy.url("newbie", token)
    assert exports["NODE_USE_ENV_PROXY"].strip("'\"") == "1"
    assert exports["SSL_CERT_FILE"].strip("'\"") == str(proxy.ca.resolve())
    # Through the printed environment, curl reaches an HTTPS upstream whose certificate
    # only the proxy trusts: it can only have gone through the proxy, with its CA.
    # (NO_PROXY is cleared because the test upstream is itself on 127.0.0.1.)
    env = {
        **{k: v for k, v in os.environ.items() if "proxy" not in k.lower()},
        **{k: v.strip("'\"") for k, v in exports.items()},
        "NO_PROXY": "",
        "no_proxy": "",
    }
    out = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"{tls.url}/e"],
        env=env,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert out.stdout == "200"


def test_plain_mitmdump_with_the_script_enforces_the_same_rules(world, tmp_path: Path) -> None:
    proxy, plain, _tls = world
    port = free_port()
    state = tmp_path / "state"
    script = Path(__file__).parent.parent / "addon" / "script.py"
    args = [
        str(Path(AXME_FW).parent / "mitmdump"),
        "--listen-host",
        "127.0.0.1",
        "--listen-port",
        str(port),
        "-s",
        str(script),
        "--set",
        f"axme_rules={proxy.rules}",
        "--set",
        f"axme_state={state}",
        "--set",
        f"confdir={state}",
        "--set",
        "flow_detail=0",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: (state / "enforced.json").exists(), 20, "mitmdump with the addon")

        def via(agent: str, token: str) -> requests.Response:
            s = requests.Session()
            s.trust_env = False
            s.proxies = {"http": f"http://{agent}:{token}@127.0.0.1:{port}"}
            return s.get(f"{plain.url}/md", timeout=10)

        assert via(DEPLOYER, DTOKEN).status_code == 200
        r = via(DEPLOYER, "nope")
        assert r.status_code == 403 and r.json()["error"] == "unknown_agent"
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert b"Traceback" not in out, out.decode(errors="replace")[-2000:]
