"""One-shot set-up for the Compose example (runs in the axme-fw image, as its user).

1. Creates the CA in /ca once, so every firewall replica presents the same CA and the
   agents trust one file (/ca/mitmproxy-ca-cert.pem, mounted read-only in them).
2. Copies /rules-src/*.yaml into the rules volume and writes agents.yaml with the
   SHA-256 of each agent's token from the environment (.env); kill.yaml is kept.
"""

import hashlib
import os
import shutil
from pathlib import Path

from mitmproxy.certs import CertStore

AGENTS = {
    "curl-agent": ("CURL_AGENT_TOKEN", ["llm", "web"]),
    "sdk-agent": ("SDK_AGENT_TOKEN", ["llm"]),
}

ca = Path(os.environ.get("INIT_CA", "/ca"))
if not (ca / "mitmproxy-ca-cert.pem").exists():
    CertStore.from_store(ca, "mitmproxy", 2048)
print("init: CA", ca / "mitmproxy-ca-cert.pem")

rules = Path(os.environ.get("INIT_RULES", "/rules"))
for old in rules.glob("*.yaml"):
    if old.name != "kill.yaml":
        old.unlink()
for src in Path(os.environ.get("INIT_RULES_SRC", "/rules-src")).glob("*.yaml"):
    shutil.copyfile(src, rules / src.name)
lines = ["# Written by init.py from the tokens in .env: edit .env, not this file.", "agents:"]
for name, (var, allow) in AGENTS.items():
    digest = hashlib.sha256(os.environ[var].encode()).hexdigest()
    lines += [f"  {name}:", f"    token_sha256: {digest}", f"    allow: [{', '.join(allow)}]"]
tmp = rules / ".agents.yaml.tmp"
tmp.write_text("\n".join(lines) + "\n")
os.replace(tmp, rules / "agents.yaml")
print("init: rules for", ", ".join(AGENTS))
