"""The chokepoint without the agent's cooperation, in a Linux network namespace.

The test builds its own world and takes it down again (even when it fails):

    host namespace                                   agent namespace (created here)
    upstream   127.0.0.1:UP   (loopback only)
    axme-fw    10.213.N.1:P   <-- veth /30 -->       10.213.N.2, lo, nothing else

The agent namespace has one link (the veth end) and one route (the /30 between the
two ends): the only address it can reach is the firewall's. The upstream listens on
the host's loopback, which is not routable from the agent namespace. So an agent that
drops its proxy variables has nowhere to go, and with them every request passes the
firewall, which can kill it. No packet goes anywhere but the namespace, the veth end
created here and the host's loopback.

Needs root and iproute2 (CI runs as root on this machine); skips with the reason else.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .rig import (
    AXME_FW,
    Proxy,
    Upstream,
    agents_yaml,
    free_port,
    make_rules,
    start_upstream,
    wait_for,
)

TOKEN = "netns-agent-token"
IP = shutil.which("ip")
CURL = shutil.which("curl")


def _cannot_run() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    if IP is None:
        return "no `ip` (iproute2) on PATH"
    if CURL is None:
        return "no curl on PATH"
    if not Path("/proc/self/ns/net").exists():
        return "this kernel has no network namespaces"
    return None


pytestmark = pytest.mark.skipif(_cannot_run() is not None, reason=str(_cannot_run()))


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    assert IP is not None
    res = subprocess.run([IP, *args], capture_output=True, text=True, timeout=20)
    if check and res.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)}: {res.stderr.strip()}")
    return res


@dataclass
class Netns:
    name: str
    host_if: str
    host_addr: str  # the firewall listens here (the host's end of the veth)
    agent_addr: str

    def run(
        self, argv: list[str], env: dict[str, str], timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the agent namespace with exactly ``env``."""
        assert IP is not None
        return subprocess.run(
            [IP, "netns", "exec", self.name, *argv],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def _free_subnet() -> int:
    """A 10.213.N.0/30 that no interface of this host uses yet (parallel runs)."""
    used = ip("-o", "-4", "addr").stdout
    for n in random.sample(range(256), 256):
        if f"10.213.{n}." not in used:
            return n
    raise AssertionError("no free 10.213.N.0/30 on this host")


@pytest.fixture(scope="module")
def netns() -> Iterator[Netns]:
    tag = f"{os.getpid() % 100000}{random.randrange(100):02d}"
    n = _free_subnet()
    ns = Netns(f"axfw-{tag}", f"axh{tag}", f"10.213.{n}.1", f"10.213.{n}.2")
    agent_if = f"axa{tag}"
    try:
        ip("netns", "add", ns.name)
        ip("link", "add", ns.host_if, "type", "veth", "peer", "name", agent_if)
        ip("link", "set", agent_if, "netns", ns.name)
        ip("addr", "add", f"{ns.host_addr}/30", "dev", ns.host_if)
        ip("link", "set", ns.host_if, "up")
        ip("-n", ns.name, "addr", "add", f"{ns.agent_addr}/30", "dev", agent_if)
        ip("-n", ns.name, "link", "set", agent_if, "up")
        ip("-n", ns.name, "link", "set", "lo", "up")
        # The agent namespace routes nothing but the /30: no default route, no gateway.
        routes = ip("-n", ns.name, "-4", "route", "show").stdout.strip().splitlines()
        assert routes == [
            f"10.213.{n}.0/30 dev {agent_if} proto kernel scope link src {ns.agent_addr}"
        ], routes
        yield ns
    finally:
        ip("netns", "del", ns.name, check=False)  # takes the agent end, so the pair, along
        ip("link", "del", ns.host_if, check=False)
    assert ns.name not in ip("netns", "list").stdout
    assert ip("link", "show", ns.host_if, check=False).returncode != 0


@pytest.fixture(scope="module")
def world(
    netns: Netns, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Proxy, Upstream]]:
    """The upstream on the host's loopback; axme-fw on the veth address only."""
    tmp = tmp_path_factory.mktemp("netns")
    rules = make_rules(
        tmp / "rules",
        defaults="version: 1\nactions:\n  local: {hosts: [127.0.0.1]}\n",
        agents=agents_yaml({"bot": (TOKEN, ["local"])}),
    )
    state = tmp / "state"
    state.mkdir()
    up = start_upstream()
    port = free_port()
    log = tmp / "proxy.log"
    argv = [AXME_FW, "run", "--rules", str(rules), "--state", str(state),
            "--listen-host", netns.host_addr, "--listen-port", str(port)]  # fmt: skip
    with open(log, "wb") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    proxy = Proxy(port, rules, state, proc, log)
    try:

        def listening() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"proxy exited {proc.returncode}:\n{log.read_text()}")
            with socket.socket() as s:
                if s.connect_ex((netns.host_addr, port)) != 0:
                    return False
            return (state / "enforced.json").exists() and proxy.ca.exists()

        wait_for(listening, 20, "the proxy on the veth address")
        yield proxy, up
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        up.server.shutdown()


def agent_env(netns: Netns, proxy: Proxy | None, bin_dir: Path | None = None) -> dict[str, str]:
    """An agent's environment: proxy variables (when ``proxy``) and the firewall's CA."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    if proxy is not None:
        url = f"http://bot:{TOKEN}@{netns.host_addr}:{proxy.port}"
        env.update(HTTP_PROXY=url, HTTPS_PROXY=url, http_proxy=url, https_proxy=url)
        env.update(SSL_CERT_FILE=str(proxy.ca), REQUESTS_CA_BUNDLE=str(proxy.ca))
    if bin_dir is not None:
        env["PATH"] = str(bin_dir)
    return env


def curl(netns: Netns, env: dict[str, str], url: str) -> tuple[int, str, str]:
    """curl inside the agent namespace: (exit code, HTTP status or "", body)."""
    assert CURL is not None
    res = netns.run([CURL, "-sS", "--max-time", "5", "-w", "\n%{http_code}", url], env)
    body, _, code = res.stdout.rpartition("\n")
    return res.returncode, code, body


def test_proxied_agent_works_and_is_killable(netns: Netns, world: tuple[Proxy, Upstream]) -> None:
    proxy, up = world
    env = agent_env(netns, proxy)
    url = f"http://127.0.0.1:{up.port}/work"
    rc, code, body = curl(netns, env, url)
    assert (rc, code) == (0, "200"), body
    assert json.loads(body)["path"] == "/work"
    assert up.paths("/work") == ["/work"]

    out = proxy.cli("kill", "bot", "--reason", "netns test").stdout
    assert "enforced by the proxy" in out
    try:
        rc, code, body = curl(netns, env, f"http://127.0.0.1:{up.port}/after-kill")
        assert code == "403", body
        assert json.loads(body)["error"] == "agent_killed"
        assert up.paths("/after-kill") == []
    finally:
        proxy.cli("resume", "bot")
    rc, code, _ = curl(netns, env, f"http://127.0.0.1:{up.port}/after-resume")
    assert code == "200"


def test_without_proxy_variables_the_upstream_is_unreachable(
    netns: Netns, world: tuple[Proxy, Upstream]
) -> None:
    _, up = world
    bare = agent_env(netns, None)
    before = len(up.seen)
    # The same direct request from the host namespace does reach it: the namespace, not
    # the upstream, is what stops the agent.
    assert CURL is not None
    host = subprocess.run(
        [CURL, "-sS", "--max-time", "5", f"http://127.0.0.1:{up.port}/direct-from-host"],
        env=bare, capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert host.returncode == 0 and up.paths("/direct-from-host") == ["/direct-from-host"]
    for target in (f"127.0.0.1:{up.port}", f"{netns.host_addr}:{up.port}"):
        rc, code, _ = curl(netns, bare, f"http://{target}/bypass")
        assert rc != 0 and code in ("", "000"), (target, rc, code)
    assert up.paths("/bypass") == []
    assert len(up.seen) == before + 1  # only the host's request


def test_doctor_inside_the_namespace_passes(
    netns: Netns, world: tuple[Proxy, Upstream], tmp_path: Path
) -> None:
    """The real "correctly wired" case: the direct-connection check passes because the
    network enforces the chokepoint, not because nothing was tried."""
    proxy, up = world
    assert CURL is not None
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "curl").symlink_to(CURL)  # no node here: the machine's Node 20 would fail
    env = agent_env(netns, proxy, bin_dir)
    canaries = ["--canary", f"127.0.0.1:{up.port}", "--canary", f"{netns.host_addr}:{up.port}"]
    res = netns.run([AXME_FW, "doctor", "--agent", "bot", "--json", *canaries], env, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    checks = {c["name"]: c for c in json.loads(res.stdout)["checks"]}
    assert all(c["status"] == "pass" for c in checks.values()), checks
    assert checks["direct connection"]["detail"].startswith("blocked: ")
    assert TOKEN not in res.stdout
    # The same doctor in the host namespace, where nothing enforces the chokepoint, fails.
    res = subprocess.run(
        [AXME_FW, "doctor", "--agent", "bot", "--json", "--canary", f"127.0.0.1:{up.port}"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 1
    direct = next(c for c in json.loads(res.stdout)["checks"] if c["name"] == "direct connection")
    assert direct["status"] == "fail"
