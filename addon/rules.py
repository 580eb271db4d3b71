"""State: a rules directory, ``rules/*.yaml`` → one frozen, validated :class:`Ruleset`.

Every ``*.yaml`` in the directory is parsed (:mod:`axme_fw.rules_file`) and merged. The
same agent or action defined in two files, an unknown key, a wrong type, a bad duration
or an action name that is not defined are errors naming ``FILE:LINE: key``.
:func:`load_dir` raises :class:`RulesError` carrying all of them; the caller keeps its
last good ruleset. The model itself is :mod:`axme_fw.ruleset`. I/O: reading the
directory, and :func:`atomic_write` for the writers of rules and state files.

Parsing is cached per file by the SHA-256 of its bytes: every file is read on each
load (cheap), but only files whose bytes changed are parsed again, so a kill — which
rewrites only ``kill.yaml`` — does not re-parse a 10,000-agent file. (Keying on inode,
size and mtime would miss an in-place edit of the same size within one mtime tick.)
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import yaml

from .rules_file import FilePart, parse_file
from .ruleset import Action, Agent, Alert, Defaults, Kill, Operator, Ruleset

KILL_FILE = "kill.yaml"
GENERATED_AGENTS_FILE = "agents.generated.yaml"
GENERATED_OPERATORS_FILE = "operators.generated.yaml"
PRICING_FILE = "pricing.yaml"  # its own format (axme_fw.cost), not merged into the rules


class RulesError(Exception):
    """Invalid rules; ``messages`` are each ``FILE:LINE: key: problem``."""

    def __init__(self, messages: list[str]) -> None:
        super().__init__("\n".join(messages))
        self.messages = messages


class Loader:
    """Loads a rules directory, re-parsing only files whose bytes changed since the last call."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._cache: dict[Path, tuple[bytes, FilePart]] = {}  # path -> (SHA-256, parse)

    def load(self) -> Ruleset:
        """Parse and merge every ``*.yaml``; raise :class:`RulesError` listing every problem.

        Every file is read each time; a file is parsed again only if the SHA-256 of its
        bytes differs from the last load's, whatever its inode, size or mtime say.
        """
        if not self.directory.is_dir():
            raise RulesError([f"{self.directory}: rules directory not found"])
        parts: list[tuple[str, FilePart]] = []
        fresh: dict[Path, tuple[bytes, FilePart]] = {}
        for path in sorted(self.directory.glob("[!.]*.yaml")):
            if path.name == PRICING_FILE:
                continue
            try:
                raw = path.read_bytes()
                sha = hashlib.sha256(raw).digest()
                cached = self._cache.get(path)
                if cached is not None and cached[0] == sha:
                    part = cached[1]
                else:
                    # Decoded as is (no newline translation): YAML reads CRLF itself, and
                    # the part's digest is then the SHA-256 of these very bytes.
                    part = parse_file(path, raw.decode("utf-8"), str(path))
            except FileNotFoundError:
                if path.is_symlink():  # broken, not removed: never "no rules" by accident
                    raise RulesError([f"{path}:1: symlink to a missing file"]) from None
                continue  # removed between glob and read: it no longer contributes
            except (OSError, UnicodeDecodeError) as exc:
                raise RulesError([f"{path}:1: cannot read: {exc}"]) from None
            fresh[path] = (sha, part)
            parts.append((str(path), part))
        self._cache = fresh
        return merge(parts)

    def load_kills(self, current: Ruleset) -> Ruleset | None:
        """Fast path after a change to ``kill.yaml`` alone: re-read only that file.

        Returns ``current`` with the new kill list and revision, or None when a full
        :meth:`load` is needed (no previous load, or kill.yaml holds more than kills).
        Raises :class:`RulesError` when kill.yaml is invalid. A kill must not wait for
        10,000 agents to be merged again: this is O(kill list).
        """
        path = self.directory / KILL_FILE
        if not self._cache:
            return None
        try:
            raw: bytes | None = path.read_bytes()
        except FileNotFoundError:
            raw = None  # deleted: it no longer contributes (an *empty* kill.yaml is invalid)
        except OSError as exc:
            raise RulesError([f"{path}:1: cannot read: {exc}"]) from None
        try:
            part = (
                parse_file(path, raw.decode("utf-8"), str(path))
                if raw is not None
                else FilePart([])
            )
        except UnicodeDecodeError as exc:
            raise RulesError([f"{path}:1: cannot read: {exc}"]) from None
        if part.errors:
            raise RulesError(part.errors)
        if (
            part.defaults
            or part.actions
            or part.agents
            or part.operators
            or part.alerts
            or (part.invalid_actions)
        ):
            return None
        cache = {k: v for k, v in self._cache.items() if k != path}
        if raw is not None:
            cache[path] = (hashlib.sha256(raw).digest(), part)
        self._cache = dict(sorted(cache.items()))
        kills: list[Kill] = []
        revision = 0
        digest = hashlib.sha256()
        for p, (_sha, fp) in self._cache.items():
            digest.update(str(p).encode() + b"\0" + fp.digest + b"\0")
            kills.extend(fp.kills)
            revision = max(revision, fp.kill_revision)
        return current.with_kills(tuple(kills), kill_revision=revision, digest=digest.hexdigest())


def load_dir(directory: Path) -> Ruleset:
    return Loader(directory).load()


def merge(parts: list[tuple[str, FilePart]]) -> Ruleset:
    errors = [e for _, p in parts for e in p.errors]
    defaults: dict[str, tuple[object, str, str]] = {}
    actions: dict[str, tuple[Action, str]] = {}
    invalid = {a for _, p in parts for a in p.invalid_actions}
    agents: dict[str, tuple[Agent, yaml.Node, str]] = {}
    operators: dict[str, Operator] = {}
    kills: list[Kill] = []
    alerts: list[Alert] = []
    revision = 0
    digest = hashlib.sha256()
    for shown, part in parts:
        digest.update(shown.encode() + b"\0" + part.digest + b"\0")
        for key, (value, where, shown_key) in part.defaults.items():
            if key in defaults:
                errors.append(f"{where}: {shown_key}: already set at {defaults[key][1]}")
            defaults[key] = (value, where, shown_key)
        for name, (action, where) in part.actions.items():
            if name in actions:
                errors.append(f"{where}: actions.{name}: already defined at {actions[name][1]}")
            actions[name] = (action, where)
        for name, entry in part.agents.items():
            if name in agents:
                errors.append(f"{entry[2]}: agents.{name}: already defined at {agents[name][2]}")
            agents[name] = entry
        for name, op in part.operators.items():
            if name in operators:
                errors.append(
                    f"{op.where}: operators.{name}: already defined at {operators[name].where}"
                )
            operators[name] = op
        kills.extend(part.kills)
        alerts.extend(part.alerts)
        revision = max(revision, part.kill_revision)
    # Dangling action names, now that every file's actions are known. An action that is
    # defined but invalid has its own error already; naming it "unknown" would mislead.
    for name, (agent, node, where) in agents.items():
        file = where.rsplit(":", 1)[0]
        for a in agent.allow:
            if a != "*" and a not in actions and a not in invalid:
                at = _line_of(node, where, file, "allow", a)
                errors.append(f"{at}: agents.{name}.allow: unknown action {a!r}{_known(actions)}")
        for lim in agent.limits:
            aname = lim.key[8:]
            if lim.key.startswith("actions.") and aname not in actions and aname not in invalid:
                at = _line_of(node, where, file, "limits", "actions", aname)
                errors.append(
                    f"{at}: agents.{name}.limits.{lim.key}: unknown action "
                    f"{aname!r}{_known(actions)}"
                )
    if errors:
        raise RulesError(errors)
    d = {k: v for k, (v, _w, _k) in defaults.items()}
    return Ruleset(
        defaults=Defaults(**d),  # type: ignore[arg-type]
        actions={k: a for k, (a, _w) in actions.items()},
        agents={k: a for k, (a, _n, _w) in agents.items()},
        kills=tuple(kills),
        alerts=tuple(alerts),
        kill_revision=revision,
        digest=digest.hexdigest(),
        operators=operators,
    )


def _line_of(node: yaml.Node, fallback: str, file: str, *path: str) -> str:
    """``FILE:LINE`` of the key (or list item) at ``path`` under ``node``; else ``fallback``."""
    for i, step in enumerate(path, start=1):
        if isinstance(node, yaml.MappingNode):
            found = next(((k, v) for k, v in node.value if k.value == step), None)
            if found is None:
                return fallback
            key_node, node = found
            if i == len(path):
                return f"{file}:{key_node.start_mark.line + 1}"
        elif isinstance(node, yaml.SequenceNode):
            item = next((n for n in node.value if getattr(n, "value", None) == step), None)
            return f"{file}:{item.start_mark.line + 1}" if item is not None else fallback
        else:
            return fallback
    return fallback


def _known(actions: Mapping[str, object]) -> str:
    return f" (defined: {', '.join(sorted(actions))})" if actions else " (no actions defined)"


def atomic_write(path: Path, data: str) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync, rename over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
