"""The kill list file: round trips, revisions, concurrent writers, broken files."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from axme_fw import killswitch
from axme_fw.killswitch import Change, KillFileError, covering
from axme_fw.rules import KILL_FILE, Loader, load_dir
from axme_fw.ruleset import Kill

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def entries(rules_dir: Path) -> list[dict[str, str]]:
    return killswitch._read(rules_dir / KILL_FILE)[1]


def test_kill_resume_round_trip(tmp_path: Path) -> None:
    c1 = killswitch.kill(tmp_path, "deployer", "block", "runaway deploys", "cli:alice")
    assert c1.revision == 1
    assert c1.removed == []
    (entry,) = c1.entries
    assert {k: v for k, v in entry.items() if k != "at"} == {
        "agent": "deployer",
        "mode": "block",
        "reason": "runaway deploys",
        "by": "cli:alice",
    }
    assert ISO.match(entry["at"])
    assert entries(tmp_path) == [entry]

    c2 = killswitch.kill(tmp_path, "coder", "park", "", "policy:limits.cost_usd")
    assert c2.revision == 2
    assert [e["agent"] for e in c2.entries] == ["deployer", "coder"]

    c3 = killswitch.resume(tmp_path, "deployer")
    assert c3 == Change(3, [c2.entries[1]], [entry])
    assert entries(tmp_path) == [c2.entries[1]]

    c4 = killswitch.resume(tmp_path, "coder")
    assert (c4.revision, c4.entries, [e["agent"] for e in c4.removed]) == (4, [], ["coder"])
    assert entries(tmp_path) == []


def test_resume_of_something_not_killed_still_bumps_the_revision(tmp_path: Path) -> None:
    assert killswitch.resume(tmp_path, "nobody") == Change(1, [], [])
    assert killswitch._read(tmp_path / KILL_FILE) == (1, [])


def test_killing_again_replaces_the_entry(tmp_path: Path) -> None:
    killswitch.kill(tmp_path, "deployer", "park", "first", "cli:a")
    c = killswitch.kill(tmp_path, "deployer", "block", "second", "cli:b")
    assert [(e["agent"], e["mode"], e["reason"]) for e in c.entries] == [
        ("deployer", "block", "second")
    ]
    assert [e["reason"] for e in c.removed] == ["first"]


def test_resume_removes_only_the_exact_pattern(tmp_path: Path) -> None:
    killswitch.kill(tmp_path, "*", "block", "stop everything", "cli:a")
    killswitch.kill(tmp_path, "deployer", "block", "x", "cli:a")
    c = killswitch.resume(tmp_path, "deployer")
    assert [e["agent"] for e in c.entries] == ["*"]
    assert covering(c.entries, "deployer") == ["*"]


@pytest.mark.parametrize(
    ("patterns", "agent", "covered"),
    [
        (["*"], "deployer", ["*"]),
        (["deployer"], "deployer", []),  # the exact entry is not "another" pattern
        (["deploy-*", "*", "coder"], "deploy-eu", ["deploy-*", "*"]),
        (["deploy-*"], "deployer", []),
        (["Deploy*"], "deployer", []),  # case-sensitive, like the proxy
        (["agent-?"], "agent-1", ["agent-?"]),
        ([], "deployer", []),
    ],
)
def test_covering(patterns: list[str], agent: str, covered: list[str]) -> None:
    assert covering([{"agent": p} for p in patterns], agent) == covered


WORKER = """
import sys
from pathlib import Path
from axme_fw import killswitch
rules, name = Path(sys.argv[1]), sys.argv[2]
sys.stdin.read()  # start together
killswitch.kill(rules, name, "block", "test", "cli:" + name)
"""


def test_concurrent_processes_lose_nothing(tmp_path: Path) -> None:
    names = [f"agent-{i:02d}" for i in range(20)]
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path), n], stdin=subprocess.PIPE)
        for n in names
    ]
    for p in procs:
        assert p.stdin is not None
        p.stdin.close()
    for p in procs:
        assert p.wait(timeout=60) == 0
    revision, kills = killswitch._read(tmp_path / KILL_FILE)
    assert revision == 20
    assert sorted(k["agent"] for k in kills) == names
    assert sorted(k["by"] for k in kills) == [f"cli:{n}" for n in names]
    # No temp files left behind to be mistaken for rules.
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [KILL_FILE]


def test_written_file_loads_as_rules(tmp_path: Path) -> None:
    loader = Loader(tmp_path)
    killswitch.kill(tmp_path, "deployer", "block", "runaway deploys", "cli:alice")
    c = killswitch.kill(tmp_path, "deploy-*", "park", "yes", "policy:limits.actions.deploy")
    rules = loader.load()
    assert rules.kill_revision == 2
    at0, at1 = c.entries[0]["at"], c.entries[1]["at"]
    # "yes" and the timestamps are quoted on write, so they stay strings.
    assert rules.kills == (
        Kill("deployer", "block", "runaway deploys", "cli:alice", at0),
        Kill("deploy-*", "park", "yes", "policy:limits.actions.deploy", at1),
    )
    assert rules.kill_for("deploy-eu") == rules.kills[1]

    killswitch.resume(tmp_path, "deployer")
    rules = loader.load()
    assert rules.kill_revision == 3
    assert [k.agent for k in rules.kills] == ["deploy-*"]


def test_hand_edited_file_is_kept_in_the_list(tmp_path: Path) -> None:
    (tmp_path / KILL_FILE).write_text(
        "# hand edit\nkills:\n  - agent: coder\n    reason: by hand\n"
    )
    c = killswitch.kill(tmp_path, "deployer", "block", "x", "cli:a")
    assert c.revision == 1
    assert [e["agent"] for e in c.entries] == ["coder", "deployer"]
    assert [k.agent for k in load_dir(tmp_path).kills] == ["coder", "deployer"]


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ("kills:\n  - agent: deployer\n    reason: [unclosed\n", 4, "YAML syntax error"),
        ("kills:\n  - agent: a\n - agent: b\n", 3, "YAML syntax error"),
        ("kills: {agent: deployer}\n", 1, "kills: expected a list of kill entries"),
        ("- agent: deployer\n", 1, "kills: expected a list of kill entries"),
    ],
)
def test_broken_kill_file_names_file_and_line(
    tmp_path: Path, text: str, line: int, problem: str
) -> None:
    path = tmp_path / KILL_FILE
    path.write_text(text)
    with pytest.raises(KillFileError) as info:
        killswitch.kill(tmp_path, "deployer", "block", "x", "cli:a")
    msg = str(info.value)
    assert msg.startswith(f"{path}:{line}: {problem}")
    if problem == "YAML syntax error":
        assert msg == f"{path}:{line}: YAML syntax error; fix or move the file"
    assert path.read_text() == text  # a broken file is never overwritten


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "kills:\n  - agent: coder\n  - deployer\n",
            "3: kills[1]: expected a mapping with 'agent', got 'deployer'",
        ),
        (
            "revision: 4\nkills:\n  - {reason: no agent}\n",
            "3: kills[0]: expected a mapping with 'agent', got {'reason': 'no agent'}",
        ),
        ("revision: '7'\nkills: []\n", "1: revision: expected a whole number, got '7'"),
        ("revision: -1\n", "1: revision: expected a whole number, got -1"),
    ],
)
def test_bad_entries_are_refused_not_dropped(tmp_path: Path, text: str, message: str) -> None:
    # Rewriting without an entry the proxy cannot read would silently resume that agent.
    path = tmp_path / KILL_FILE
    path.write_text(text)
    with pytest.raises(KillFileError) as info:
        killswitch.kill(tmp_path, "x", "block", "", "cli:a")
    assert str(info.value) == f"{path}:{message}"
    assert path.read_text() == text


def test_wait_enforced(tmp_path: Path) -> None:
    assert killswitch.wait_enforced(tmp_path, 1, timeout=0) is None
    (tmp_path / killswitch.ENFORCED_FILE).write_text(json.dumps({"revision": 3, "port": 8080}))
    assert killswitch.wait_enforced(tmp_path, 3, timeout=0) == {"revision": 3, "port": 8080}
    assert killswitch.wait_enforced(tmp_path, 2, timeout=0) == {"revision": 3, "port": 8080}
    assert killswitch.wait_enforced(tmp_path, 4, timeout=0) is None
