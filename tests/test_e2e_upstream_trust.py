"""Two trust relationships, one per side of the firewall.

- Agents trust the **firewall's** CA (``state/mitmproxy-ca-cert.pem``): the proxy
  intercepts TLS and presents certificates it signs.
- The firewall trusts **upstream** servers through certifi's bundle, not the system
  store. An internal service with a private CA needs
  ``axme-fw run --set ssl_verify_upstream_trusted_ca=FILE``.

The upstream here is an HTTPS server whose certificate comes from a private trustme CA.
"""

from __future__ import annotations

import base64
import http.client
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from mitmproxy.certs import CertStore

from .rig import Proxy, Upstream, agents_yaml, make_rules, start_proxy, start_upstream, upstream_ca

TOKEN = "trust-token"


@pytest.fixture(scope="module")
def private_upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Upstream, Path]]:
    tmp = tmp_path_factory.mktemp("trust")
    _, ctx, pem = upstream_ca(tmp)
    up = start_upstream(ctx)
    try:
        yield up, pem
    finally:
        up.server.shutdown()


def proxy_for(tmp: Path, name: str, pem: Path | None) -> Proxy:
    rules = make_rules(
        tmp / f"rules-{name}",
        defaults="version: 1\nactions:\n  internal: {hosts: [127.0.0.1]}\n",
        agents=agents_yaml({"bot": (TOKEN, ["internal"])}),
    )
    return start_proxy(rules, tmp / f"state-{name}", pem)


def test_firewall_trusts_a_private_upstream_ca_only_when_told(
    private_upstream: tuple[Upstream, Path], tmp_path: Path
) -> None:
    up, pem = private_upstream
    trusting = proxy_for(tmp_path, "trusting", pem)
    default = proxy_for(tmp_path, "default", None)
    try:
        # With ssl_verify_upstream_trusted_ca: the agent, trusting the firewall's CA, gets
        # through to the internal service.
        r = trusting.session("bot", TOKEN).get(f"{up.url}/with-ca", timeout=10)
        assert r.status_code == 200, r.text
        assert up.paths("/with-ca") == ["/with-ca"]

        # Without it the firewall verifies against certifi, which does not know the
        # private CA: the request never reaches the service.
        r = default.session("bot", TOKEN).get(f"{up.url}/without-ca", timeout=10)
        assert r.status_code == 502, r.text
        assert "Certificate verify failed: unable to get local issuer certificate" in r.text
        assert up.paths("/without-ca") == []
    finally:
        trusting.stop()
        default.stop()


def test_agents_trust_the_firewall_ca_not_the_upstream_ca(
    private_upstream: tuple[Upstream, Path], tmp_path: Path
) -> None:
    up, pem = private_upstream
    proxy = proxy_for(tmp_path, "agent-side", pem)
    try:
        # The agent sees the firewall's certificate for the upstream host, so a client
        # that trusts only the upstream's own CA refuses the connection...
        s = proxy.session("bot", TOKEN)
        s.verify = str(pem)
        with pytest.raises(requests.exceptions.SSLError):
            s.get(f"{up.url}/upstream-ca-only", timeout=10)
        assert up.paths("/upstream-ca-only") == []
        # ...and one that trusts the firewall's CA gets through.
        r = proxy.session("bot", TOKEN).get(f"{up.url}/firewall-ca", timeout=10)
        assert r.status_code == 200
        # The certificate the agent sees is the firewall's, issued for the upstream host.
        conn = http.client.HTTPSConnection(
            "127.0.0.1", proxy.port, timeout=10, context=proxy.ssl_context()
        )
        auth = base64.b64encode(f"bot:{TOKEN}".encode()).decode()
        conn.set_tunnel("127.0.0.1", up.port, headers={"Proxy-Authorization": f"Basic {auth}"})
        conn.request("GET", "/peek")
        assert conn.getresponse().status == 200
        assert conn.sock is not None
        cert: dict[str, Any] = conn.sock.getpeercert() or {}
        conn.close()
        issuer = {k: v for rdn in cert["issuer"] for k, v in rdn}
        assert issuer["organizationName"] == "mitmproxy"
        assert ("IP Address", "127.0.0.1") in cert["subjectAltName"]
    finally:
        proxy.stop()


def test_replicas_share_a_ca_through_confdir(
    private_upstream: tuple[Upstream, Path], tmp_path: Path
) -> None:
    """What Compose and Kubernetes rely on: two proxies started with ``--set confdir=CA``
    over one pre-made CA present certificates from that CA, not each from its own."""
    up, pem = private_upstream
    ca_dir = tmp_path / "ca"
    CertStore.from_store(ca_dir, "mitmproxy", 2048)  # what deploy/compose/init.py does
    shared_ca = ca_dir / "mitmproxy-ca-cert.pem"
    before = {p.name: p.read_bytes() for p in ca_dir.iterdir()}
    rules = make_rules(
        tmp_path / "rules",
        defaults="version: 1\nactions:\n  internal: {hosts: [127.0.0.1]}\n",
        agents=agents_yaml({"bot": (TOKEN, ["internal"])}),
    )
    proxies = [
        start_proxy(rules, tmp_path / f"state-{i}", pem, "--set", f"confdir={ca_dir}")
        for i in range(2)
    ]
    try:
        for i, proxy in enumerate(proxies):
            s = proxy.session("bot", TOKEN)
            s.verify = str(shared_ca)
            r = s.get(f"{up.url}/replica-{i}", timeout=10)
            assert r.status_code == 200
        assert up.paths("/replica-") == ["/replica-0", "/replica-1"]
        assert {p.name: p.read_bytes() for p in ca_dir.iterdir()} == before
        # Each state dir still gets a CA of its own (mitmproxy makes one before --set
        # applies): it is not the one presented, so trusting it fails.
        own = proxies[0].session("bot", TOKEN)
        assert proxies[0].ca.read_bytes() != shared_ca.read_bytes()
        with pytest.raises(requests.exceptions.SSLError):
            own.get(f"{up.url}/state-ca", timeout=10)
    finally:
        for proxy in proxies:
            proxy.stop()
