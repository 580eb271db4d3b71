"""Shared rig: the agents, rules directories and kill files the sections write."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from .common import basic_auth, sha256_hex


@dataclass(frozen=True)
class Cred:
    """An agent's proxy credentials."""

    agent: str
    token: str

    @property
    def auth(self) -> str:
        return basic_auth(self.agent, self.token)


BENCH = Cred("bench", "bench-token-throughput")
KILLER = Cred("killer", "bench-token-killer")
PARKER = Cred("parker", "bench-token-parker")
LIMITED = Cred("limited", "bench-token-limited")  # only in the firewalls of section redis


def gen_token(i: int) -> str:
    """The token of generated agent ``i`` (``a00000``, ``a00001``, ...)."""
    return f"tok-{i:05d}"


def write_rules(directory: Path, agents: int, actions: int, park_max: int) -> None:
    """Write a rules directory: ``actions`` actions + ``local``, ``agents`` agents."""
    directory.mkdir(parents=True, exist_ok=True)
    lines = [
        "version: 1",
        "defaults:",
        "  unknown_agents: deny",
        f"  park: {{timeout: 10m, max_per_agent: {park_max}}}",
        "  audit: {decisions: denied}",
        "actions:",
        "  local: {hosts: [127.0.0.1, localhost]}",
    ]
    for i in range(actions):
        if i % 3 == 0:
            lines.append(f"  act{i:03d}: {{hosts: [api{i}.example.com, '*.svc{i}.example.net']}}")
        elif i % 3 == 1:
            lines.append(f"  act{i:03d}: {{hosts: [api{i}.example.com], methods: [GET, POST]}}")
        else:
            lines.append(
                f"  act{i:03d}: {{hosts: [api{i}.example.com], methods: [POST], "
                f"paths: ['/v{i}/projects/*/deploy']}}"
            )
    (directory / "base.yaml").write_text("\n".join(lines) + "\n")
    bench_lines = ["version: 1", "agents:"]
    for cred in (BENCH, KILLER, PARKER):
        allow = ", ".join([f"act{(7 * k + 3) % max(actions, 1):03d}" for k in range(5)][:actions])
        allow = f"{allow}, local" if allow else "local"
        bench_lines.append(
            f"  {cred.agent}: {{token_sha256: {sha256_hex(cred.token)}, allow: [{allow}]}}"
        )
    (directory / "bench-agents.yaml").write_text("\n".join(bench_lines) + "\n")
    write_agents_file(directory / "agents.yaml", agents - 3, actions, [])


def agent_file(cred: Cred, limits: str = "") -> str:
    """A rules file with one agent allowed [local]; ``limits``: a YAML flow mapping."""
    lim = f", limits: {limits}" if limits else ""
    return (
        "version: 1\nagents:\n"
        f"  {cred.agent}: {{token_sha256: {sha256_hex(cred.token)}, allow: [local]{lim}}}\n"
    )


def write_agents_file(path: Path, n: int, actions: int, extra: Sequence[Cred]) -> None:
    """``n`` generated agents (a00000...) plus ``extra`` allowed [local]; atomic rename."""
    out = ["version: 1", "agents:"]
    for i in range(max(n, 0)):
        allow = ", ".join(f"act{(i * 7 + k * 13) % actions:03d}" for k in range(5))
        out.append(
            f"  a{i:05d}: {{token_sha256: {sha256_hex(gen_token(i))}, allow: [{allow}, local]}}"
        )
    for cred in extra:
        out.append(f"  {cred.agent}: {{token_sha256: {sha256_hex(cred.token)}, allow: [local]}}")
    tmp = path.with_name(f".{path.name}.bench.tmp")
    tmp.write_text("\n".join(out) + "\n")
    os.replace(tmp, path)


def kill_file_revision(rules: Path) -> int:
    """The revision of ``rules/kill.yaml`` (0 when there is none)."""
    try:
        data = yaml.safe_load((rules / "kill.yaml").read_text())
    except FileNotFoundError:
        return 0
    rev = data.get("revision", 0) if isinstance(data, dict) else 0
    return rev if isinstance(rev, int) else 0


def write_kill_file(rules: Path, kills: list[dict[str, str]], rename: bool = True) -> Path:
    """Prepare kill.yaml's next revision beside it; rename into place unless told not to."""
    body = yaml.safe_dump(
        {"revision": kill_file_revision(rules) + 1, "kills": kills}, sort_keys=False
    )
    prep = rules / "kill.prep"  # not *.yaml: the watcher ignores it until the rename
    with open(prep, "w") as fh:
        fh.write(body)
        fh.flush()
        os.fsync(fh.fileno())
    if rename:
        os.rename(prep, rules / "kill.yaml")
    return prep
