"""The admin listener, end to end: /healthz, /readyz, and agents kept out of it."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.rig import (
    AXME_FW,
    Proxy,
    Upstream,
    agents_yaml,
    free_port,
    make_rules,
    start_proxy,
    wait_for,
)

TOKEN = "admin-test-token"


@pytest.fixture
def proxy(tmp_path: Path, up: Upstream) -> Iterator[Proxy]:
    base = 'version: 1\nactions:\n  any: {hosts: ["*"]}\n'
    rules = make_rules(tmp_path / "rules", base=base, agents=agents_yaml({"bot": (TOKEN, ["any"])}))
    p = start_proxy(rules, tmp_path / "state")
    yield p
    p.stop()


def admin(proxy: Proxy, path: str) -> requests.Response:
    s = requests.Session()
    s.trust_env = False
    return s.get(f"http://127.0.0.1:{proxy.admin_port}{path}", timeout=10)


def test_healthz_and_readyz_answer_without_auth(proxy: Proxy) -> None:
    r = admin(proxy, "/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    r = admin(proxy, "/readyz")
    assert r.status_code == 200 and r.json() == {"status": "ready"}
    r = admin(proxy, "/nope")
    assert r.status_code == 404 and r.json()["error"] == "not_found"
    ack = json.loads((proxy.state / "enforced.json").read_text())
    assert ack["admin"] == f"127.0.0.1:{proxy.admin_port}"


def test_readyz_is_503_when_the_audit_log_cannot_be_written(proxy: Proxy) -> None:
    log = proxy.state / "audit.jsonl"
    wait_for(lambda: log.exists(), 10, "the audit log")
    saved = log.read_bytes()
    log.unlink()
    log.mkdir()  # root writes anywhere: a directory in its place is what cannot be written
    try:
        r = admin(proxy, "/readyz")
        assert r.status_code == 503
        assert r.json()["error"] == "not_ready:audit"
        assert str(log) in r.json()["detail"]
        assert admin(proxy, "/healthz").status_code == 200  # alive, just not ready
    finally:
        shutil.rmtree(log)
        log.write_bytes(saved)
    wait_for(lambda: admin(proxy, "/readyz").status_code == 200, 10, "ready again")


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]"])
def test_an_agent_cannot_reach_the_admin_api_through_the_proxy(proxy: Proxy, host: str) -> None:
    # bot may go anywhere ("*"), and still not there.
    r = proxy.session("bot", TOKEN).get(f"http://{host}:{proxy.admin_port}/healthz", timeout=10)
    assert r.status_code == 403 and r.json()["error"] == "control_forbidden"
    res = subprocess.run(
        [
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
            f"https://127.0.0.1:{proxy.admin_port}/healthz",
        ],
        capture_output=True,
        text=True,
        env=proxy.env("bot", TOKEN),
        timeout=20,
    )
    assert res.stdout != "200"  # CONNECT refused: no tunnel to the admin port


def test_the_admin_listener_settings_are_checked(tmp_path: Path) -> None:
    rules = make_rules(tmp_path / "rules", base="version: 1\nactions:\n  a: {hosts: [x]}\n")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                AXME_FW,
                "run",
                "--rules",
                str(rules),
                "--state",
                str(tmp_path / "s"),
                "--listen-port",
                str(free_port()),
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=20,
            stdin=subprocess.DEVNULL,
        )

    res = run("--admin-listen", "0.0.0.0:9")
    assert res.returncode == 2 and "--admin-insecure" in res.stderr
    res = run("--admin-listen", "nonsense")
    assert res.returncode == 2 and "use HOST:PORT (or off)" in res.stderr
    # A taken admin port stops the proxy with a clear line, never a half-started proxy.
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        res = run("--admin-listen", f"127.0.0.1:{taken.getsockname()[1]}")
    assert res.returncode != 0 and "cannot serve the admin API" in res.stdout + res.stderr
