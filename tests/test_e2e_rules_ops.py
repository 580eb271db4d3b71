"""Rules on disk as operators and platforms really change them, end to end.

Empty files, in-place writes, Kubernetes ConfigMap swaps, a symlinked rules
directory, and the on-call commands (status, kill, pause, resume, audit, env) while a
rules file is broken. Each case failed on the code before issue 11.
"""

from __future__ import annotations

import json
import os
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
    make_rules,
    replace_file,
    start_proxy,
    wait_for,
)

TOKEN = "ops-bot-token"
OTHER = agents_yaml({"other": ("other-token", ["ok"])})  # bot is not in the rules


def base(up: Upstream) -> str:
    return f"""\
version: 1
defaults:
  unknown_agents: allow
actions:
  ok: {{hosts: ["127.0.0.1:{up.port}"], paths: ["/ok/**"]}}
"""


def get(proxy: Proxy, path: str, up: Upstream, user: str = "bot") -> requests.Response:
    return proxy.session(user, TOKEN).get(f"{up.url}{path}", timeout=10)


def rejected(proxy: Proxy) -> int:
    return len(proxy.audit_events("rules.rejected"))


@pytest.fixture
def proxy(tmp_path: Path, up: Upstream) -> Iterator[Proxy]:
    rules = make_rules(
        tmp_path / "rules", base=base(up), agents=agents_yaml({"bot": (TOKEN, ["ok"])})
    )
    p = start_proxy(rules, tmp_path / "state")
    yield p
    p.stop()


# ---------------------------------------------------------------- empty files


@pytest.mark.parametrize("content", ["", "  \n\n", "# emptied\n"])
def test_an_emptied_rules_file_is_refused_and_the_restricted_agent_stays_restricted(
    proxy: Proxy, up: Upstream, content: str
) -> None:
    assert get(proxy, "/admin", up).status_code == 403  # bot: only /ok/**
    before = rejected(proxy)
    with open(proxy.rules / "agents.yaml", "w") as fh:  # an in-place save, or `> agents.yaml`
        fh.write(content)
    wait_for(lambda: rejected(proxy) > before, 10, "the rejection")
    rec = proxy.audit_events("rules.rejected")[-1]
    assert "agents.yaml:1: empty file" in rec["errors"][0]
    # With unknown_agents: allow, accepting it would have let bot go anywhere.
    r = get(proxy, "/admin", up)
    assert r.status_code == 403 and r.json()["error"] == "action_not_allowed"
    assert get(proxy, "/ok/x", up).status_code == 200
    check = proxy.cli("rules", "check", check=False)
    assert check.returncode == 1
    assert f"{proxy.rules / 'agents.yaml'}:1: empty file" in check.stderr


def test_a_file_written_in_two_steps_is_read_once_when_whole(proxy: Proxy, up: Upstream) -> None:
    before_rej, before_ok = rejected(proxy), len(proxy.audit_events("rules.reloaded"))
    path = proxy.rules / "agents.yaml"
    new = agents_yaml({"bot": (TOKEN, ["ok"]), "two": (TOKEN, ["ok"])})
    with open(path, "w") as fh:  # truncate, close ...
        pass
    with open(path, "a") as fh:  # ... then write: never tried while empty
        fh.write(new)
    wait_for(lambda: len(proxy.audit_events("rules.reloaded")) > before_ok, 10, "the reload")
    assert get(proxy, "/ok/x", up, user="two").status_code == 200
    assert rejected(proxy) == before_rej


# ---------------------------------------------------------------- ConfigMap and symlinks


def configmap(directory: Path, stamp: str, files: dict[str, str]) -> None:
    """Lay out or update ``directory`` exactly as the kubelet does for a ConfigMap volume."""
    data = directory / f"..{stamp}"
    data.mkdir()
    for name, text in files.items():
        (data / name).write_text(text)
    old = os.readlink(directory / "..data") if (directory / "..data").is_symlink() else None
    tmp = directory / "..data_tmp"
    tmp.symlink_to(data.name)
    os.replace(tmp, directory / "..data")
    for name in files:
        link = directory / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")
    if old is not None:
        shutil.rmtree(directory / old)


def test_a_configmap_update_is_in_force_like_a_plain_edit(tmp_path: Path, up: Upstream) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    configmap(
        rules,
        "2026_12_04_01",
        {"base.yaml": base(up), "agents.yaml": OTHER},
    )
    proxy = start_proxy(rules, tmp_path / "state")
    try:
        assert get(proxy, "/ok/x", up).status_code == 200  # unknown, and unknowns allowed
        assert get(proxy, "/admin", up).status_code == 200
        configmap(
            rules,
            "2026_12_04_02",
            {"base.yaml": base(up), "agents.yaml": agents_yaml({"bot": (TOKEN, ["ok"])})},
        )
        wait_for(lambda: get(proxy, "/admin", up).status_code == 403, 10, "the new ConfigMap")
        assert get(proxy, "/ok/x", up).status_code == 200
        assert not (rules / "..2026_12_04_01").exists()
    finally:
        proxy.stop()


def test_a_rules_directory_symlink_swapped_to_a_new_target(tmp_path: Path, up: Upstream) -> None:
    v1 = make_rules(tmp_path / "rules-v1", base=base(up), agents=OTHER)
    v2 = make_rules(
        tmp_path / "rules-v2", base=base(up), agents=agents_yaml({"bot": (TOKEN, ["ok"])})
    )
    link = tmp_path / "rules"
    link.symlink_to(v1.name)
    proxy = start_proxy(link, tmp_path / "state")
    try:
        assert get(proxy, "/admin", up).status_code == 200
        tmp = tmp_path / "rules.tmp"
        tmp.symlink_to(v2.name)
        os.replace(tmp, link)  # `ln -sfn rules-v2 rules`, atomically
        wait_for(lambda: get(proxy, "/admin", up).status_code == 403, 10, "the new target")
        # ... and later edits in the new target are watched.
        replace_file(v2 / "agents.yaml", agents_yaml({"bot": (TOKEN, ["ok"])}, bot="addresses: []"))
        wait_for(
            lambda: len(proxy.audit_events("rules.reloaded")) >= 2, 10, "an edit in the new target"
        )
    finally:
        proxy.stop()


# ---------------------------------------------------------------- on-call while rules are broken


def test_status_kill_pause_resume_work_while_a_rules_file_is_broken(
    proxy: Proxy, up: Upstream
) -> None:
    assert get(proxy, "/ok/x", up).status_code == 200
    before = rejected(proxy)
    replace_file(proxy.rules / "agents.yaml", "agents:\n  bot: {token_sha256: [oops\n")
    wait_for(lambda: rejected(proxy) > before, 10, "the rejection")
    res = proxy.cli("status", "--json")
    data = json.loads(res.stdout)
    assert [a["agent"] for a in data["agents"]] == ["bot"]  # what the proxy enforces
    assert data["rules_warning"].startswith("warning: rules on disk are broken: ")
    assert f"{proxy.rules / 'agents.yaml'}:3: YAML syntax error" in data["rules_warning"]
    table = proxy.cli("status")
    assert "bot" in table.stdout
    assert table.stderr.count("\n") == 1 and f"{proxy.rules / 'agents.yaml'}:3:" in table.stderr
    kill = proxy.cli("kill", "bot", "--reason", "broken night")
    assert "enforced" in kill.stdout
    assert get(proxy, "/ok/x", up).json()["error"] == "agent_killed"
    killed = json.loads(proxy.cli("status", "--json").stdout)["agents"][0]
    assert killed["state"] == "killed" and killed["reason"] == "broken night"
    proxy.cli("resume", "bot")
    proxy.cli("pause", "bot")
    assert json.loads(proxy.cli("status", "--json").stdout)["agents"][0]["state"] == "paused"
    proxy.cli("resume", "bot")
    assert get(proxy, "/ok/x", up).status_code == 200


# ---------------------------------------------------------------- options


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AXME_FW_")}
    return subprocess.run(
        [AXME_FW, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=20
    )


def test_audit_state_option_means_the_same_wherever_it_stands(proxy: Proxy, tmp_path: Path) -> None:
    work = tmp_path / "elsewhere"
    work.mkdir()
    state = str(proxy.state)
    for args in (("audit", "--state", state, "verify"), ("audit", "verify", "--state", state)):
        res = cli(*args, cwd=work)
        assert res.returncode == 0, res.stderr
        assert f"records in {proxy.state / 'audit.jsonl'}" in res.stdout
    missing = tmp_path / "no-such-state"
    cases: tuple[tuple[str, ...], ...] = (
        ("audit", "--state", str(missing), "verify"),
        ("audit", "verify", "--state", str(missing)),
        ("audit", "--state", str(missing)),
        ("status", "--state", str(missing), "--rules", str(proxy.rules)),
    )
    for bad in cases:
        res = cli(*bad, cwd=work)
        assert res.returncode == 1, bad
        assert res.stderr == (
            f"axme-fw: state directory {missing} not found; set it with --state or AXME_FW_STATE\n"
        )
    res = cli("audit", "verify", cwd=work)  # ./state does not exist here either
    assert res.returncode == 1 and f"state ({work / 'state'}) not found" in res.stderr
    res = cli("kill", "bot", "--rules", str(tmp_path / "nope"), "--state", state, cwd=work)
    assert res.returncode == 1
    assert "rules directory" in res.stderr and "--rules or AXME_FW_RULES" in res.stderr
    # The group's --json reaches verify; --agent does not apply to it and says so.
    res = cli("audit", "--json", "--state", state, "verify", cwd=work)
    assert res.returncode == 0 and json.loads(res.stdout)["ok"] is True
    res = cli("audit", "--agent", "bot", "--state", state, "verify", cwd=work)
    assert res.returncode == 2 and "--agent does not apply" in res.stderr


def test_audit_state_verify_checks_the_directory_it_was_given(proxy: Proxy, tmp_path: Path) -> None:
    log = proxy.state / "audit.jsonl"
    proxy.stop()
    lines = log.read_text().splitlines()
    lines[0] = lines[0].replace('"proxy.started"', '"proxy.startet"')
    log.write_text("\n".join(lines) + "\n")
    res = cli("audit", "--state", str(proxy.state), "verify", cwd=tmp_path)
    assert res.returncode == 1 and "line 1" in res.stderr


# ---------------------------------------------------------------- env


def exports(out: str) -> dict[str, str]:
    return {
        k.removeprefix("export "): v.strip("'\"")
        for k, v in (line.split("=", 1) for line in out.splitlines() if line.startswith("export "))
    }


def test_env_derives_no_proxy_from_the_rules_and_the_proxy_address(
    proxy: Proxy, up: Upstream
) -> None:
    # The rules send 127.0.0.1 through the proxy: NO_PROXY must not cover it.
    res = proxy.cli("env", "bot")
    ex = exports(res.stdout)
    assert ex["NO_PROXY"] == "" and ex["no_proxy"] == ""
    why = f"(actions.ok.hosts: 127.0.0.1:{up.port})"
    assert f"# NO_PROXY is empty: the rules send loopback through the proxy {why}\n" in res.stdout
    assert ex["HTTPS_PROXY"] == f"http://bot:$AXME_FW_TOKEN@127.0.0.1:{proxy.port}"
    explicit = exports(proxy.cli("env", "bot", "--proxy", "fw.internal:3128").stdout)
    assert explicit["HTTP_PROXY"].endswith("@fw.internal:3128")
    unknown = proxy.cli("env", "nobody", check=False)
    assert unknown.returncode == 1 and "no agent 'nobody'" in unknown.stderr


def test_env_keeps_loopback_direct_when_no_rule_routes_it(tmp_path: Path) -> None:
    rules = make_rules(
        tmp_path / "rules",
        base="version: 1\nactions:\n  llm: {hosts: [api.openai.com]}\n",
        agents=agents_yaml({"bot": (TOKEN, ["llm"])}),
    )
    state = tmp_path / "state"
    state.mkdir()
    res = cli("env", "bot", "--rules", str(rules), "--state", str(state), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    ex = exports(res.stdout)
    assert ex["NO_PROXY"] == "localhost,127.0.0.1,::1"
    assert "no proxy has run" in res.stdout  # the address is assumed, and said so
