"""State: the kill list, ``rules/kill.yaml``: read-modify-write under a lock, written atomically.

Written by ``axme-fw kill/pause/resume`` and by the proxy's auto-kills. Each write
bumps ``revision``; the running proxy records the revision it enforces in
``state/enforced.json`` so the CLI can wait until its kill is really in force.
"""

from __future__ import annotations

import fnmatch
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock

from .audit import now_iso
from .rules import KILL_FILE, atomic_write
from .state import read_json

ENFORCED_FILE = "enforced.json"

_HEADER = (
    "# The kill list. Written by `axme-fw kill/pause/resume` and by policy auto-kills.\n"
    "# Hand edits are read like any rules file, but comments here are not kept.\n"
)


class KillFileError(Exception):
    """kill.yaml cannot be read as a kill list; the message names the file."""


@dataclass(frozen=True)
class Change:
    revision: int
    entries: list[dict[str, Any]]  # the kill list after the change
    removed: list[dict[str, Any]]  # entries the change removed


def _read(path: Path) -> tuple[int, list[dict[str, Any]]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return 0, []
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        raise KillFileError(f"{path}:{line}: YAML syntax error; fix or move the file") from None
    if data is None:
        return 0, []
    if not isinstance(data, dict) or not isinstance(data.get("kills", []), list):
        raise KillFileError(f"{path}:1: kills: expected a list of kill entries")
    kills = data.get("kills") or []
    for i, k in enumerate(kills):
        # Refuse, never drop: rewriting without a hand-made entry would resume that agent.
        if not isinstance(k, dict) or "agent" not in k:
            line = _entry_line(text, i)
            raise KillFileError(
                f"{path}:{line}: kills[{i}]: expected a mapping with 'agent', got {k!r}"
            )
    revision = data.get("revision", 0)
    if not isinstance(revision, int) or isinstance(revision, bool) or revision < 0:
        # A reset revision would let the CLI mistake an old acknowledgement for its own.
        raise KillFileError(f"{path}:1: revision: expected a whole number, got {revision!r}")
    return revision, kills


def _entry_line(text: str, index: int) -> int:
    """The line of ``kills[index]`` in ``text`` (1 if it cannot be found)."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if isinstance(root, yaml.MappingNode):
        for k, v in root.value:
            if k.value == "kills" and isinstance(v, yaml.SequenceNode) and index < len(v.value):
                return int(v.value[index].start_mark.line) + 1
    return 1


def update(
    rules_dir: Path, mutate: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]
) -> Change:
    """Apply ``mutate`` to the kill list under the lock; returns the new revision."""
    path = rules_dir / KILL_FILE
    with FileLock(str(rules_dir / f".{KILL_FILE}.lock")):
        revision, kills = _read(path)
        before = list(kills)
        after = mutate(list(kills))
        revision += 1
        body = yaml.safe_dump({"revision": revision, "kills": after}, sort_keys=False)
        atomic_write(path, _HEADER + body)
    return Change(revision, after, [k for k in before if k not in after])


def kill(
    rules_dir: Path, agent: str, mode: str, reason: str, by: str, at: str | None = None
) -> Change:
    """Add (or replace) the entry for ``agent`` (a name or a glob)."""
    entry = {"agent": agent, "mode": mode, "reason": reason, "by": by, "at": at or now_iso()}

    def mutate(kills: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [k for k in kills if k.get("agent") != agent] + [entry]

    return update(rules_dir, mutate)


def resume(rules_dir: Path, agent: str) -> Change:
    """Remove the entries for exactly ``agent`` (the same name or glob that was killed)."""
    return update(rules_dir, lambda kills: [k for k in kills if k.get("agent") != agent])


def covering(kills: list[dict[str, Any]], agent: str) -> list[str]:
    """Patterns still in the list that match ``agent`` (e.g. ``*`` after ``resume deployer``)."""
    return [
        str(k.get("agent"))
        for k in kills
        if k.get("agent") != agent and fnmatch.fnmatchcase(agent, str(k.get("agent", "")))
    ]


def read_enforced(state_dir: Path) -> dict[str, Any] | None:
    return read_json(state_dir / ENFORCED_FILE)


def wait_enforced(state_dir: Path, revision: int, timeout: float) -> dict[str, Any] | None:
    """Poll until the proxy says it enforces ``revision`` (or later); None on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        data = read_enforced(state_dir)
        if (
            data is not None
            and isinstance(data.get("revision"), int)
            and data["revision"] >= revision
        ):
            return data
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.002)
