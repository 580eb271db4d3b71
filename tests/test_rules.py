"""The rules parser: one fixture directory per failure mode, exact messages asserted.

Each ``tests/fixtures/rules/<case>/`` is a rules directory (files are merged), so the
cross-file cases (the same agent in two files, ...) are fixtures too. Expected
messages are written with ``{d}``, the fixture directory as the loader shows it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from axme_fw.rules import Loader, RulesError, load_dir
from axme_fw.ruleset import (
    EMPTY,
    Agent,
    Defaults,
    Kill,
    Limit,
    Ruleset,
    make_action,
    token_digest,
)

FIXTURES = Path(__file__).parent / "fixtures" / "rules"
TOKEN = "tok"
TOKEN_SHA = "1a7674eb4ee78df7e1ac439a93c3fa8e3c945784d4dec9fd8e3011738b2f1d62"
EVENTS = (
    "agent.auto_killed, agent.killed, agent.paused, agent.recovered, agent.resumed, "
    "agent.stale, budget.warning, rules.rejected, store.down, store.restored, store.up"
)

_EMPTY = "empty file: a rules file holds at least one key (to remove its rules, delete the file)"
ERROR_CASES: dict[str, list[str]] = {
    # Never "a file with no rules": a truncated agents.yaml would make its agents unknown.
    "empty_files": [
        f"{{d}}/comments.yaml:1: {_EMPTY}",
        f"{{d}}/empty.yaml:1: {_EMPTY}",
        f"{{d}}/whitespace.yaml:1: {_EMPTY}",
    ],
    "yaml_syntax": [
        "{d}/rules.yaml:4: YAML syntax error: did not find expected ',' or '}}'",
    ],
    "unknown_top_level_key": [
        "{d}/rules.yaml:2: agent: unknown key "
        "(expected one of: actions, agents, alerts, defaults, kills, operators, revision, version)",
    ],
    "unknown_agent_key": [
        "{d}/rules.yaml:6: agents.deployer.alow: unknown key "
        "(expected one of: addresses, allow, heartbeat, limits, token_sha256)",
    ],
    "list_for_mapping": [
        "{d}/rules.yaml:4: agents: expected a mapping, got a list",
    ],
    "string_for_number": [
        "{d}/rules.yaml:8: agents.deployer.limits.requests.max: expected a number, got str '500'",
    ],
    "infinite_number": [
        "{d}/rules.yaml:8: agents.deployer.limits.requests.max: expected a finite number, got .inf",
    ],
    "top_level_list": [
        "{d}/rules.yaml:1: expected a mapping, got a list",
    ],
    "bad_duration": [
        "{d}/rules.yaml:10: agents.deployer.limits.requests.per: "
        "bad duration '1 hour' (use 30s, 5m, 1h, 1d)",
    ],
    # No default: every limit says what happens when it is exceeded. The line is the
    # limit mapping's (for a block mapping, that of its first key).
    "missing_on_exceed": [
        "{d}/rules.yaml:8: agents.deployer.limits.requests.on_exceed: "
        "required (kill | park | throttle)",
        "{d}/rules.yaml:9: agents.deployer.limits.cost_usd.on_exceed: "
        "required (kill | park | throttle)",
        "{d}/rules.yaml:12: agents.deployer.limits.actions.deploy.on_exceed: "
        "required (kill | park | throttle)",
    ],
    "bad_on_exceed": [
        "{d}/rules.yaml:8: agents.deployer.limits.requests.on_exceed: "
        "must be one of kill | park | throttle, got 'explode'",
    ],
    "warn_at_over_one": [
        "{d}/rules.yaml:8: agents.deployer.limits.cost_usd.warn_at: "
        "must be a fraction between 0 and 1, got 1.5",
    ],
    "missing_token": [
        "{d}/rules.yaml:5: agents.deployer.token_sha256: required (run `axme-fw agent add NAME`)",
    ],
    "token_not_hex": [
        "{d}/rules.yaml:5: agents.deployer.token_sha256: "
        "must be 64 hex characters (printed by `axme-fw agent add`)",
        "{d}/rules.yaml:8: agents.coder.token_sha256: "
        "must be 64 hex characters (printed by `axme-fw agent add`)",
    ],
    "dangling_allow": [
        "{d}/rules.yaml:9: agents.deployer.allow: unknown action 'depoly' (defined: deploy, llm)",
    ],
    "dangling_limit_action": [
        "{d}/rules.yaml:9: agents.deployer.limits.actions.deploy: "
        "unknown action 'deploy' (defined: llm)",
    ],
    # An action that is defined but invalid is reported once, not again as "unknown".
    "invalid_action_not_dangling": [
        "{d}/rules.yaml:2: actions.deploy.paths[0]: must start with '/', got 'v2/projects'",
    ],
    "duplicate_agent": [
        "{d}/b.yaml:4: agents.deployer: already defined at {d}/a.yaml:4",
    ],
    "duplicate_action": [
        "{d}/b.yaml:3: actions.llm: already defined at {d}/a.yaml:2",
    ],
    "defaults_two_files": [
        "{d}/b.yaml:5: defaults.park.timeout: already set at {d}/a.yaml:3",
        "{d}/b.yaml:6: defaults.unknown_agents: already set at {d}/a.yaml:2",
    ],
    "duplicate_key": [
        "{d}/rules.yaml:7: agents.deployer.allow: defined twice",
    ],
    "bad_version": [
        "{d}/rules.yaml:1: version: unsupported version '2' (expected 1)",
    ],
    "bad_alert_event": [
        f"{{d}}/rules.yaml:3: alerts[0].events[1]: unknown event 'agent.exploded' "
        f"(known: {EVENTS})",
    ],
    "webhook_not_http": [
        "{d}/rules.yaml:2: alerts[0].webhook: must be an http(s) URL, got 'ftp://example.com/hook'",
        "{d}/rules.yaml:3: alerts[1].webhook: required",
    ],
    "bad_kill_entry": [
        "{d}/kill.yaml:4: kills[0].mode: must be one of block | park, got 'stop'",
        "{d}/kill.yaml:5: kills[1].agent: required",
    ],
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_error_case_messages(case: str) -> None:
    d = FIXTURES / case
    with pytest.raises(RulesError) as info:
        load_dir(d)
    expected = [m.format(d=d) for m in ERROR_CASES[case]]
    assert info.value.messages == expected
    assert str(info.value) == "\n".join(expected)


def test_every_error_fixture_has_a_case() -> None:
    valid = {"pricing_ignored", "full_example"}
    on_disk = {p.name for p in FIXTURES.iterdir() if p.is_dir()}
    assert on_disk == set(ERROR_CASES) | valid


def test_missing_directory() -> None:
    d = FIXTURES / "no_such_dir"
    with pytest.raises(RulesError) as info:
        load_dir(d)
    assert info.value.messages == [f"{d}: rules directory not found"]


def test_empty_directory_is_empty_ruleset(tmp_path: Path) -> None:
    rules = load_dir(tmp_path)
    assert rules.agents == {}
    assert rules.defaults == EMPTY.defaults
    assert rules.digest == hashlib.sha256().hexdigest()


def test_pricing_yaml_is_not_read_as_rules() -> None:
    rules = load_dir(FIXTURES / "pricing_ignored")
    assert list(rules.agents) == ["deployer"]
    assert list(rules.actions) == ["llm"]


def test_hidden_and_non_yaml_files_are_ignored(tmp_path: Path) -> None:
    (tmp_path / ".kill.yaml.123.tmp").write_text("garbage: [")
    (tmp_path / ".draft.yaml").write_text("garbage: [")
    (tmp_path / "notes.yml").write_text("garbage: [")
    assert load_dir(tmp_path).agents == {}


def test_full_design_example() -> None:
    d = FIXTURES / "full_example"
    rules = load_dir(d)
    assert rules.defaults == Defaults(
        unknown_agents="deny",
        mode="enforce",
        park_timeout=600.0,
        park_max_per_agent=1000,
        audit_decisions="denied",
        stale_after=300.0,
    )
    assert [(a.webhook, sorted(a.events)) for a in rules.alerts] == [
        ("http://127.0.0.1:9000/hook", ["agent.auto_killed", "agent.stale", "budget.warning"])
    ]
    assert list(rules.actions) == ["llm", "deploy"]
    llm, deploy = rules.actions["llm"], rules.actions["deploy"]
    assert llm.hosts == ("api.openai.com", "api.anthropic.com")
    assert llm.methods is None
    assert llm.paths == ()
    assert deploy.hosts == ("run.googleapis.com",)
    assert deploy.methods == frozenset({"POST"})
    assert deploy.paths == ("/v2/projects/*/services",)

    agent = rules.agents["deployer"]
    assert agent.token_sha256 == TOKEN_SHA == token_digest(TOKEN)
    assert agent.allow == ("llm", "deploy")
    assert agent.addresses == ("deployer.internal:8080",)
    assert agent.stale_after == 300.0
    assert agent.where == f"{d}/rules.yaml:14"
    assert agent.limits == (
        Limit("requests", 500.0, 3600.0, "kill"),
        Limit("cost_usd", 50.0, 86400.0, "park", 0.8),
        Limit("actions.deploy", 3.0, 21600.0, "kill"),
    )
    # The kill.yaml beside it: an unquoted timestamp is kept as written.
    assert rules.kills == (
        Kill("deployer", "block", "runaway deploys", "cli:alice", "2026-11-23T03:04:05Z"),
    )
    assert rules.kill_for("deployer") == rules.kills[0]
    assert rules.kill_for("coder") is None
    assert rules.agent_at("deployer.internal", 8080) == "deployer"


def write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


RULES = f"""\
actions:
  llm: {{hosts: [api.openai.com]}}
agents:
  deployer: {{token_sha256: {TOKEN_SHA}, allow: [llm]}}
"""


def with_requests_limit(max: str, per: str) -> str:
    limits = f"limits: {{requests: {{max: {max}, per: {per}, on_exceed: throttle}}}}"
    return RULES.replace("allow: [llm]}", f"allow: [llm], {limits}}}")


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("1d", 86400.0), ("1.5h", 5400.0),
     ("250ms", 0.25)],
)  # fmt: skip
def test_durations_in_seconds(tmp_path: Path, value: str, seconds: float) -> None:
    write(tmp_path / "r.yaml", with_requests_limit(max="1", per=value))
    (lim,) = load_dir(tmp_path).agents["deployer"].limits
    assert lim.per == seconds


@pytest.mark.parametrize(
    ("value", "parsed"),
    [("0x10", 16.0), ("1_000", 1000.0), ("2.5", 2.5), ("7", 7.0), ("1:30", 90.0)],
)
def test_numbers_read_as_yaml_reads_them(tmp_path: Path, value: str, parsed: float) -> None:
    write(tmp_path / "r.yaml", with_requests_limit(max=value, per="1h"))
    (lim,) = load_dir(tmp_path).agents["deployer"].limits
    assert lim.max == parsed


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("0", "must be greater than 0, got 0"),
        ("-1", "must be greater than 0, got -1"),
        (".nan", "expected a finite number, got .nan"),
        ("-.inf", "expected a finite number, got -.inf"),
        ("true", "expected a number, got bool 'true'"),
        ("[1]", "expected a number, got a list"),
    ],
)
def test_bad_numbers(tmp_path: Path, value: str, problem: str) -> None:
    write(tmp_path / "r.yaml", with_requests_limit(max=value, per="1h"))
    with pytest.raises(RulesError) as info:
        load_dir(tmp_path)
    assert info.value.messages == [
        f"{tmp_path}/r.yaml:4: agents.deployer.limits.requests.max: {problem}"
    ]


# -- the loader cache ------------------------------------------------------------------


def test_loader_reparses_only_the_changed_file(tmp_path: Path) -> None:
    write(tmp_path / "agents.yaml", RULES)
    write(tmp_path / "defaults.yaml", "defaults: {mode: enforce}\n")
    loader = Loader(tmp_path)
    first = loader.load()
    assert first.defaults.mode == "enforce"
    assert first.agents["deployer"].allow == ("llm",)

    # Same mtime second is possible; a different size makes the change visible anyway.
    write(tmp_path / "defaults.yaml", "defaults: {mode: report}   # now reporting\n")
    second = loader.load()
    assert second.defaults.mode == "report"
    assert second.agents["deployer"] is first.agents["deployer"]  # the cached parse
    assert second.digest != first.digest


def test_loader_sees_an_in_place_edit_of_the_same_size_and_mtime(tmp_path: Path) -> None:
    # ext4 stamps mtime at kernel-tick granularity: an editor rewriting a file in place
    # (same inode) with same-size content can leave (inode, size, mtime) unchanged.
    path = tmp_path / "defaults.yaml"
    write(path, "defaults: {mode: enforce}\n")
    before = path.stat()
    loader = Loader(tmp_path)
    first = loader.load()
    assert first.defaults.mode == "enforce"

    with open(path, "r+b") as fh:  # in place: same inode
        fh.write(b"defaults: {mode: report} \n")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_ino,
        before.st_size,
        before.st_mtime_ns,
    )
    second = loader.load()
    assert second.defaults.mode == "report"
    assert second.digest != first.digest


def test_loader_keeps_the_parse_and_digest_of_unchanged_bytes(tmp_path: Path) -> None:
    write(tmp_path / "agents.yaml", RULES)
    loader = Loader(tmp_path)
    first = loader.load()
    os.utime(tmp_path / "agents.yaml", ns=(1, 1))  # touched, not changed
    second = loader.load()
    assert second.agents["deployer"] is first.agents["deployer"]
    assert second.digest == first.digest
    # The digest depends only on names and bytes, not on the loader's cache.
    assert load_dir(tmp_path).digest == first.digest


def test_loader_sees_a_file_replaced_by_rename(tmp_path: Path) -> None:
    write(tmp_path / "agents.yaml", RULES)
    loader = Loader(tmp_path)
    assert loader.load().agents["deployer"].allow == ("llm",)
    tmp = tmp_path / ".agents.yaml.tmp"
    write(tmp, RULES.replace("allow: [llm]", "allow: []"))
    os.replace(tmp, tmp_path / "agents.yaml")
    assert loader.load().agents["deployer"].allow == ()


def test_loader_forgets_a_removed_file_and_reports_a_new_error(tmp_path: Path) -> None:
    write(tmp_path / "agents.yaml", RULES)
    write(tmp_path / "kill.yaml", "kills: [{agent: deployer}]\n")
    loader = Loader(tmp_path)
    assert loader.load().kill_for("deployer") is not None
    (tmp_path / "kill.yaml").unlink()
    assert loader.load().kill_for("deployer") is None
    write(tmp_path / "kill.yaml", "kills: {agent: deployer}\n")
    with pytest.raises(RulesError) as info:
        loader.load()
    assert info.value.messages == [f"{tmp_path}/kill.yaml:1: kills: expected a list, got a mapping"]


def test_revision_is_the_highest_in_any_file(tmp_path: Path) -> None:
    write(tmp_path / "kill.yaml", "revision: 7\nkills: []\n")
    assert load_dir(tmp_path).kill_revision == 7


# -- kill lookup and addresses ---------------------------------------------------------


def ruleset(
    kills: tuple[Kill, ...] = (), addresses: dict[str, tuple[str, ...]] | None = None
) -> Ruleset:
    agents = {
        name: Agent(name, TOKEN_SHA, (), addrs, (), 0.0, "x:1")
        for name, addrs in (addresses or {}).items()
    }
    return Ruleset(Defaults(), {}, agents, kills, (), 0, "")


def kill(agent: str, mode: str = "block") -> Kill:
    return Kill(agent, mode, f"reason {agent}", "cli:test", "2026-01-01T00:00:00Z")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("pattern", "agent", "matches"),
    [
        ("deployer", "deployer", True),
        ("deployer", "deployer-2", False),
        ("deploy-*", "deploy-eu", True),
        ("deploy-*", "deployer", False),
        ("deploy-*", "Deploy-eu", False),  # names are case-sensitive
        ("*", "anything", True),
        ("*", "anonymous", True),
        ("agent-?", "agent-1", True),
        ("agent-?", "agent-12", False),
        ("agent-[ab]", "agent-b", True),
        ("agent-[ab]", "agent-c", False),
    ],
)
def test_kill_patterns(pattern: str, agent: str, matches: bool) -> None:
    k = kill(pattern)
    assert ruleset((k,)).kill_for(agent) == (k if matches else None)


def test_exact_kill_wins_over_an_earlier_glob() -> None:
    star, exact = kill("*", "park"), kill("deployer", "block")
    rules = ruleset((star, exact))
    assert rules.kill_for("deployer") is exact
    assert rules.kill_for("coder") is star


def test_first_glob_wins() -> None:
    a, b = kill("deploy-*"), kill("*")
    assert ruleset((a, b)).kill_for("deploy-1") is a


@pytest.mark.parametrize(
    ("host", "port", "agent"),
    [
        ("deployer.internal", 8080, "deployer"),
        ("DEPLOYER.internal", 8080, "deployer"),
        ("deployer.internal", 443, None),
        ("coder.internal", 1, "coder"),  # a bare host covers every port
        ("coder.internal", 65535, "coder"),
        ("10.0.0.5", 9000, "worker"),
        ("10.0.0.5", 9001, None),
        ("elsewhere", 8080, None),
    ],
)
def test_agent_at(host: str, port: int, agent: str | None) -> None:
    rules = ruleset(
        addresses={
            "deployer": ("deployer.internal:8080",),
            "coder": ("Coder.Internal",),
            "worker": ("10.0.0.5:9000",),
        }
    )
    assert rules.agent_at(host, port) == agent


def test_agent_at_without_addresses() -> None:
    assert ruleset(addresses={"a": ()}).agent_at("a", 80) is None


# -- actions ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "port", "method", "path", "ok"),
    [
        ("run.googleapis.com", 443, "POST", "/v2/projects/p1/services", True),
        ("RUN.googleapis.com", 443, "POST", "/v2/projects/p1/services?x=1", True),
        ("run.googleapis.com", 443, "GET", "/v2/projects/p1/services", False),
        ("run.googleapis.com", 443, "POST", "/v2/projects/p1/services/extra", False),
        ("run.googleapis.com", 443, "POST", "/v1/projects/p1/services", False),
        ("evil.com", 443, "POST", "/v2/projects/p1/services", False),
        ("a.run.googleapis.com", 443, "POST", "/v2/projects/p1/services", False),
    ],
)
def test_action_matches(host: str, port: int, method: str, path: str, ok: bool) -> None:
    action = make_action("deploy", ["run.googleapis.com"], ["post"], ["/v2/projects/*/services"])
    assert action.matches(host, port, method, path) is ok


@pytest.mark.parametrize(
    ("host", "port", "ok"),
    [
        ("raw.githubusercontent.com", 443, True),
        ("githubusercontent.com", 443, False),
        ("localhost", 8080, True),
        ("localhost", 8081, False),
        ("api.github.com", 443, True),
    ],
)
def test_action_host_globs_and_ports(host: str, port: int, ok: bool) -> None:
    action = make_action(
        "a", ["*.githubusercontent.com", "localhost:8080", "API.github.com"], None, []
    )
    assert action.matches_host(host, port) is ok


@pytest.mark.parametrize(
    ("pattern", "path", "ok"),
    [
        ("/v2/projects/*/services", "/v2/projects/a/services", True),
        ("/v2/projects/*/services", "/v2/projects//services", True),  # empty segment
        ("/v2/projects/*/services", "/v2/projects/a/b/services", False),  # * stops at /
        ("/v2/projects/*", "/v2/projects/a", True),
        ("/v2/projects/*", "/v2/projects/a/services", False),
        ("/v2/**/services", "/v2/projects/a/b/services", True),  # ** crosses /
        ("/v2/**/services", "/v2/x/services", True),
        ("/v2/**/services", "/v2/x/services/y", False),
        ("/v2/**", "/v2/projects/a/b", True),
        ("/v2/**", "/v3/projects", False),
        ("/**", "/anything/at/all", True),
        ("/v?/models", "/v1/models", True),
        ("/v?/models", "/v12/models", False),
        ("/a?b", "/a/b", False),  # ? is not /
        ("/v1/models", "/v1/models", True),
        ("/v1/models", "/v1/models/", False),
        ("/v1/Models", "/v1/models", False),  # paths are case-sensitive
        ("/v1/[ab]", "/v1/a", False),  # brackets are literal, not a class
        ("/v1/[ab]", "/v1/[ab]", True),
        ("/v1/a.b", "/v1/axb", False),  # regex metacharacters are literal
        ("/v1/a+b(c)", "/v1/a+b(c)", True),
        ("/v1/*", "/v1/a?x=/y", True),  # the query string is not part of the path
    ],
)
def test_action_path_globs(pattern: str, path: str, ok: bool) -> None:
    action = make_action("a", ["example.com"], None, [pattern])
    assert action.matches("example.com", 443, "GET", path) is ok


def test_action_any_of_several_paths() -> None:
    action = make_action("a", ["example.com"], None, ["/a/*", "/b/**"])
    assert action.matches("example.com", 443, "GET", "/a/x") is True
    assert action.matches("example.com", 443, "GET", "/b/x/y") is True
    assert action.matches("example.com", 443, "GET", "/a/x/y") is False


@pytest.mark.parametrize(
    ("pattern", "host", "ok"),
    [
        ("*.example.com", "a.b.example.com", True),  # fnmatch: * also spans dots
        ("*.example.com", "example.com", False),
        ("API.Example.com", "api.example.COM", True),  # case-insensitive both ways
        ("api?.example.com", "api2.example.com", True),
        ("api[12].example.com", "api2.example.com", True),  # fnmatch classes for hosts
        ("api[12].example.com", "api3.example.com", False),
        ("*", "anything.at.all", True),
    ],
)
def test_action_host_globs_are_fnmatch(pattern: str, host: str, ok: bool) -> None:
    assert make_action("a", [pattern], None, []).matches_host(host, 443) is ok


def test_action_without_hosts_matches_nothing() -> None:
    assert make_action("none", [], None, []).matches_host("x", 1) is False
