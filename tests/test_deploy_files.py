"""The deployment files, checked without Docker or a cluster.

There is no Docker daemon and no Kubernetes cluster where the tests run, so these tests
parse the files and assert the invariants that make the chokepoint hold: the image runs
as a non-root user with a health check, the Compose agents can reach nothing but the
firewall, and the Kubernetes manifests are schema-valid and wired to real ports and
labels.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from axme_fw.rules import Loader

from .rig import free_port

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "deploy" / "compose"
K8S = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.33.0"

# ---------------------------------------------------------------- Dockerfile


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` in order: comments dropped, continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends in a continuation"
    return out


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"not the exec (JSON) form: {args}"
    return [str(v) for v in value]


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions((ROOT / "Dockerfile").read_text())


def last(instrs: list[tuple[str, str]], name: str) -> str:
    found = [args for word, args in instrs if word == name]
    assert found, f"no {name} in the Dockerfile"
    return found[-1]


def test_dockerfile_parser_sees_continuations_and_comments() -> None:
    got = dockerfile_instructions("# c\nFROM a\nRUN x \\\n  # inner\n  && y\nUSER 1\n")
    assert got == [("FROM", "a"), ("RUN", "x  && y"), ("USER", "1")]


def test_dockerfile_base_user_volumes(dockerfile: list[tuple[str, str]]) -> None:
    assert dockerfile[0] == ("FROM", "python:3.13-slim")
    user = last(dockerfile, "USER")
    assert user.split(":")[0] not in ("root", "0"), user
    # The user is created in the image, and it is the last USER: the entry point runs as it.
    assert any(w == "RUN" and "useradd" in a and user in a for w, a in dockerfile)
    volumes = exec_form(last(dockerfile, "VOLUME"))
    assert set(volumes) == {"/rules", "/state"}
    env = " ".join(a for w, a in dockerfile if w == "ENV")
    assert "AXME_FW_RULES=/rules" in env and "AXME_FW_STATE=/state" in env
    # The package comes from the repo, not from a registry.
    assert ("COPY", "addon ./addon") in dockerfile
    assert any(w == "RUN" and a.startswith("pip install .") for w, a in dockerfile)


def test_dockerfile_entrypoint_and_healthcheck(dockerfile: list[tuple[str, str]]) -> None:
    entry = exec_form(last(dockerfile, "ENTRYPOINT"))
    cmd = exec_form(last(dockerfile, "CMD"))
    assert entry[:2] == ["axme-fw", "run"]
    assert entry[entry.index("--listen-host") + 1] == "0.0.0.0"
    argv = entry + cmd
    assert argv[argv.index("--admin-listen") + 1] == "0.0.0.0:8081"
    assert "--admin-insecure" in argv
    health = last(dockerfile, "HEALTHCHECK")
    assert "CMD" in health
    assert "http://127.0.0.1:8081/readyz" in health
    ports = last(dockerfile, "EXPOSE").split()
    assert {"8080", "8081"} <= set(ports)


@pytest.mark.parametrize("status", [200, 503, None])
def test_healthcheck_command_tracks_readyz(status: int | None) -> None:
    """The health check's one-liner, run as written (its port moved to a free one):
    healthy on 200 from /readyz, unhealthy on 503 or when nothing listens."""
    instrs = dockerfile_instructions((ROOT / "Dockerfile").read_text())
    health = last(instrs, "HEALTHCHECK")
    argv = exec_form(health[health.index("CMD") + 3 :].strip())
    assert argv[:2] == ["python", "-c"]
    assert "127.0.0.1:8081/readyz" in argv[2]
    paths: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            paths.append(self.path)
            self.send_response(status or 500)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = HTTPServer(("127.0.0.1", 0), Handler)
    port = server.server_address[1]
    if status is None:
        server.server_close()  # nothing listens on that port any more
    else:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        script = argv[2].replace("127.0.0.1:8081", f"127.0.0.1:{port}")
        # A proxy variable in the container must not send the check elsewhere.
        env = dict(os.environ, http_proxy=f"http://127.0.0.1:{free_port()}", no_proxy="")
        res = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, timeout=20, env=env
        )
    finally:
        if status is not None:
            server.shutdown()
            server.server_close()
    assert (res.returncode == 0) == (status == 200), res.stderr
    if status is not None:
        assert paths == ["/readyz"]


def test_dockerignore_keeps_secrets_and_state_out() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "state", ".env"} <= ignored
    # What the image copies must not be ignored.
    for needed in ("addon", "rules", "pyproject.toml", "README.md"):
        assert needed not in ignored


# ---------------------------------------------------------------- Compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((COMPOSE / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def agents_of(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in compose["services"].items() if k.endswith("-agent")}


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def test_compose_networks(compose: dict[str, Any]) -> None:
    nets = compose["networks"]
    internal = [n for n, spec in nets.items() if (spec or {}).get("internal") is True]
    assert internal == ["agents"]
    agents = agents_of(compose)
    assert set(agents) == {"curl-agent", "sdk-agent"}
    for name, svc in agents.items():
        assert svc["networks"] == ["agents"], f"{name} must be on the internal network only"
        assert "network_mode" not in svc and "ports" not in svc, name
    fw = compose["services"]["firewall"]
    assert set(fw["networks"]) == {"agents", "egress"}
    # Nothing else sits on the agents' network: the firewall is their only peer.
    on_agents = {n for n, s in compose["services"].items() if "agents" in (s.get("networks") or [])}
    assert on_agents == {"firewall", *agents}


def test_compose_agents_use_the_firewall_and_its_ca(compose: dict[str, Any]) -> None:
    proxy = re.compile(r"^http://(?P<user>[\w-]+):\$\{(?P<var>\w+)\}@firewall:8080$")
    volumes = compose["volumes"]
    for name, svc in agents_of(compose).items():
        env = env_of(svc)
        for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            m = proxy.match(env.get(var, ""))
            assert m, f"{name}: {var}={env.get(var)!r} does not point at the firewall"
            assert m["user"] == name
        assert env.get("NO_PROXY") == ""
        assert env["SSL_CERT_FILE"] == "/ca/mitmproxy-ca-cert.pem"
        assert "ca:/ca:ro" in svc["volumes"], f"{name}: the CA volume must be read-only"
        assert "ca" in volumes
    fw_vols = compose["services"]["firewall"]["volumes"]
    assert "ca:/ca" in fw_vols
    assert "confdir=/ca" in compose["services"]["firewall"]["command"]


def test_compose_replicas_redis_and_tokens(compose: dict[str, Any]) -> None:
    svc = compose["services"]
    fw = svc["firewall"]
    assert fw["deploy"]["replicas"] == 2
    assert env_of(fw)["AXME_FW_REDIS_URL"] == "redis://redis:6379/0"
    assert "redis" in svc
    assert fw["depends_on"]["init"]["condition"] == "service_completed_successfully"
    # Tokens come from .env, never written in the file.
    text = (COMPOSE / "compose.yaml").read_text()
    example = (COMPOSE / ".env.example").read_text()
    for var in re.findall(r"^(\w+)=", example, re.M):
        assert f"${{{var}" in text, var
    for line in example.splitlines():
        if "=" in line and not line.startswith("#"):
            assert line.split("=", 1)[1] not in text
    # Admin API published on the host's loopback only.
    assert all(p.startswith("127.0.0.1:") for p in fw["ports"])


def test_compose_init_writes_rules_the_firewall_accepts(tmp_path: Path) -> None:
    """init.py (run by Compose before the firewall) turns .env tokens into valid rules."""
    rules, ca = tmp_path / "rules", tmp_path / "ca"
    rules.mkdir()
    (rules / "stale.yaml").write_text("agents: {}\n")  # e.g. the image's example rules
    (rules / "kill.yaml").write_text("revision: 3\nkills: []\n")
    env = dict(
        os.environ,
        INIT_CA=str(ca),
        INIT_RULES=str(rules),
        INIT_RULES_SRC=str(COMPOSE / "rules"),
        CURL_AGENT_TOKEN="t-curl",
        SDK_AGENT_TOKEN="t-sdk",
    )
    subprocess.run([sys.executable, str(COMPOSE / "init.py")], env=env, check=True, timeout=60)
    assert (ca / "mitmproxy-ca-cert.pem").exists() and (ca / "mitmproxy-ca.pem").exists()
    assert sorted(p.name for p in rules.glob("*.yaml")) == [
        "agents.yaml",
        "defaults.yaml",
        "kill.yaml",
    ]
    ruleset = Loader(rules).load()
    for name, token in (("curl-agent", "t-curl"), ("sdk-agent", "t-sdk")):
        agent = ruleset.agents[name]
        assert agent.token_sha256 == hashlib.sha256(token.encode()).hexdigest()
    assert set(agents_of(yaml.safe_load((COMPOSE / "compose.yaml").read_text()))) == set(
        ruleset.agents
    )


# ---------------------------------------------------------------- Kubernetes


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for res in kust["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / res).read_text()) if d]
    return docs


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def test_k8s_every_file_is_listed(manifests: list[dict[str, Any]]) -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files


def test_k8s_schema_valid(manifests: list[dict[str, Any]]) -> None:
    for doc in manifests:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_k8s_validator_rejects_a_broken_manifest(manifests: list[dict[str, Any]]) -> None:
    """The schema check can fail (a test that cannot fail proves nothing)."""
    svc = json.loads(json.dumps(one(manifests, "Service", "axme-fw")))
    svc["spec"]["ports"][0]["port"] = "eighty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(svc, K8S_VERSION, strict=True)
    dep = json.loads(json.dumps(one(manifests, "Deployment", "axme-fw")))
    dep["spec"]["template"]["spec"]["containers"][0]["readynessProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, K8S_VERSION, strict=True)


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def named_ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def test_k8s_firewall_deployment(manifests: list[dict[str, Any]]) -> None:
    dep = one(manifests, "Deployment", "axme-fw")
    spec = dep["spec"]
    pod = spec["template"]
    assert spec["replicas"] == 2
    assert matches(spec["selector"]["matchLabels"], pod["metadata"]["labels"])
    podspec = pod["spec"]
    assert podspec["securityContext"]["runAsNonRoot"] is True
    assert podspec["securityContext"]["runAsUser"] != 0
    (fw,) = podspec["containers"]
    ports = named_ports(fw)
    assert ports == {"proxy": 8080, "admin": 8081}
    argv = fw["args"]
    assert argv[argv.index("--admin-listen") + 1] == f"0.0.0.0:{ports['admin']}"
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = fw[probe]["httpGet"]
        assert get["path"] == path
        assert get["port"] in ("admin", ports["admin"])
    assert fw["resources"]["requests"] and fw["resources"]["limits"]
    for c in podspec["containers"] + podspec["initContainers"]:
        assert c["securityContext"]["readOnlyRootFilesystem"] is True, c["name"]
        assert c["securityContext"]["allowPrivilegeEscalation"] is False, c["name"]
    # Every path the firewall writes is a writable volume, not the read-only root.
    volumes = {v["name"]: v for v in podspec["volumes"]}
    mounts = {m["mountPath"]: m for m in fw["volumeMounts"]}
    for path in ("/rules", "/state", "/tmp"):
        assert path in mounts, path
        assert "emptyDir" in volumes[mounts[path]["name"]], path
        assert not mounts[path].get("readOnly")
    env = {e["name"]: e for e in fw["env"]}
    assert env["AXME_FW_RULES"]["value"] == "/rules"
    assert env["AXME_FW_STATE"]["value"] == "/state"
    assert env["AXME_FW_REDIS_URL"]["value"].startswith("redis://axme-fw-redis:6379")
    secret = env["AXME_FW_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert secret["key"] in one(manifests, "Secret", secret["name"])["stringData"]
    # The rules come from the ConfigMap, copied into the writable rules directory.
    src = volumes["rules-src"]["configMap"]["name"]
    assert one(manifests, "ConfigMap", src)["data"]


def test_k8s_services_target_real_ports(manifests: list[dict[str, Any]]) -> None:
    deployments = [d for d in manifests if d["kind"] == "Deployment"]
    for svc in (d for d in manifests if d["kind"] == "Service"):
        backs = [
            d
            for d in deployments
            if matches(svc["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(backs) == 1, f"Service {svc['metadata']['name']} selects {len(backs)}"
        ports: dict[str | int, int] = {}
        for c in backs[0]["spec"]["template"]["spec"]["containers"]:
            for name, number in named_ports(c).items():
                ports[name] = number
                ports[number] = number
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in ports, (svc["metadata"]["name"], p)
    redis_url = "redis://axme-fw-redis:6379/0"
    assert one(manifests, "Service", "axme-fw-redis")["spec"]["ports"][0]["port"] == int(
        redis_url.rsplit(":", 1)[1].split("/")[0]
    )


def test_k8s_networkpolicy_agents_reach_only_firewall_and_dns(
    manifests: list[dict[str, Any]],
) -> None:
    pol = one(manifests, "NetworkPolicy", "agents-egress-only-via-firewall")
    spec = pol["spec"]
    # Egress is in policyTypes: whatever no rule below allows is denied.
    assert spec["policyTypes"] == ["Egress"]
    assert "ingress" not in spec
    agent_pod = one(manifests, "Deployment", "deployer")["spec"]["template"]
    assert matches(spec["podSelector"]["matchLabels"], agent_pod["metadata"]["labels"])
    firewall_pod = one(manifests, "Deployment", "axme-fw")["spec"]["template"]
    fw_ports = named_ports(firewall_pod["spec"]["containers"][0])
    rules = spec["egress"]
    assert len(rules) == 2
    for rule in rules:
        assert rule.get("to") and rule.get("ports"), "a rule without to/ports allows everything"
        for peer in rule["to"]:
            assert "ipBlock" not in peer
    fw_rule, dns_rule = rules
    (peer,) = fw_rule["to"]
    assert set(peer) == {"podSelector"}
    assert matches(peer["podSelector"]["matchLabels"], firewall_pod["metadata"]["labels"])
    assert fw_rule["ports"] == [{"protocol": "TCP", "port": fw_ports["proxy"]}]
    # Not the admin port: agents can never reach the admin API.
    assert all(p["port"] != fw_ports["admin"] for r in rules for p in r["ports"])
    (dns,) = dns_rule["to"]
    assert dns["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kube-system"}
    assert dns["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    assert sorted((p["protocol"], p["port"]) for p in dns_rule["ports"]) == [
        ("TCP", 53),
        ("UDP", 53),
    ]


def test_k8s_example_agent_is_wired_to_the_service(manifests: list[dict[str, Any]]) -> None:
    pod = one(manifests, "Deployment", "deployer")["spec"]["template"]["spec"]
    (agent,) = pod["containers"]
    env = {e["name"]: e for e in agent["env"]}
    svc = one(manifests, "Service", "axme-fw")
    proxy_port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "proxy")
    want = f"http://deployer:$(DEPLOYER_TOKEN)@axme-fw:{proxy_port}"
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        assert env[var]["value"] == want, var
    # $(DEPLOYER_TOKEN) expands only when that variable is defined before the others.
    names = [e["name"] for e in agent["env"]]
    assert names.index("DEPLOYER_TOKEN") < names.index("HTTP_PROXY")
    ref = env["DEPLOYER_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref["key"] in one(manifests, "Secret", ref["name"])["stringData"]
    assert env["NODE_USE_ENV_PROXY"]["value"] == "1"
    mount = next(m for m in agent["volumeMounts"] if m["mountPath"] == "/ca")
    assert mount["readOnly"] is True
