"""Control: watch the rules directory (watchdog/inotify) and call back on the event loop.

What counts as a change, and when it is handed on:

- A rules file renamed into place (editors, ``axme-fw kill``) or deleted is complete:
  handed on at once.
- A file written in place (``cp``, an editor that truncates then writes, ``>``) is
  handed on only once it has stopped changing: after its close (or, for a writer that
  keeps it open, ``QUIET`` seconds with no event), its bytes are hashed, hashed again
  ``SETTLE`` seconds later, and handed on only when both agree; otherwise the wait
  starts again. A half-written file is never even tried.
- A Kubernetes ConfigMap volume swaps a ``..data`` symlink (``agents.yaml ->
  ..data/agents.yaml``); any event on a ``..`` name, a directory or a symlink in the
  directory means "everything may have changed": a full reload.
- A rules directory that is itself a symlink swapped to a new target: the directory's
  parent is watched for that name, and its target is re-checked every
  ``TARGET_CHECK`` seconds as a backstop; on a new target the watch moves there and a
  full reload follows.

Hashing and waiting happen on this module's own thread; the callback runs on the
asyncio loop (``call_soon_threadsafe``), never on watchdog's thread, and is
coalesced: a burst of changes schedules one call. ``ALL`` in the names it passes
means "reload everything".
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from watchdog.events import (
    DirModifiedEvent,
    EventsLostEvent,
    FileClosedEvent,
    FileClosedNoWriteEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileOpenedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import ObservedWatch

log = logging.getLogger(__name__)

ALL = "*"  # in the names handed on: reload every file
QUIET = 0.5  # a file still open for writing: handed on after this long without an event
SETTLE = 0.05  # the second hash of a file written in place, this long after the first
TARGET_CHECK = 1.0  # backstop: how often a symlinked rules directory's target is checked


def is_rules_file(path: str | bytes) -> bool:
    name = _name(path)
    return name.endswith(".yaml") and not name.startswith(".")


def _name(path: str | bytes) -> str:
    return Path(path if isinstance(path, str) else path.decode()).name


def _digest(path: Path) -> bytes | None:
    try:
        return hashlib.sha256(path.read_bytes()).digest()
    except OSError:
        return None


class _Pending:
    """A file written in place, waiting until two reads of it agree."""

    __slots__ = ("digest", "due")

    def __init__(self, due: float) -> None:
        self.due = due
        self.digest: bytes | bool | None = False  # False: not hashed yet


class _Handler(FileSystemEventHandler):
    def __init__(self, owner: RulesWatcher) -> None:
        self._owner = owner

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            self._owner._event(event)
        except Exception:  # never let a watcher thread die: the backstop would be all left
            log.exception("axme-fw: rules watcher failed on an event")


class _ParentHandler(FileSystemEventHandler):
    def __init__(self, owner: RulesWatcher) -> None:
        self._owner = owner

    def on_any_event(self, event: FileSystemEvent) -> None:
        names = {_name(event.src_path), _name(getattr(event, "dest_path", "") or "")}
        if self._owner.configured.name in names:
            self._owner._check_target()


class RulesWatcher:
    """Calls ``on_change(names)`` on ``loop`` after changes in ``directory``; ``names`` are the
    file names changed since the previous call (coalesced), or contain :data:`ALL`."""

    def __init__(
        self,
        directory: Path,
        loop: asyncio.AbstractEventLoop,
        on_change: Callable[[frozenset[str]], None],
    ) -> None:
        self.configured = Path(os.path.abspath(directory))
        self._loop = loop
        self._on_change = on_change
        self._pending_names: set[str] = set()  # on the loop: handed on, not yet delivered
        self._lock = threading.Condition()
        self._waiting: dict[str, _Pending] = {}  # on the settle thread: files being written
        self._stopped = False
        self._observer = Observer()
        self.target = self.configured.resolve()
        self._watch: ObservedWatch | None = self._observer.schedule(
            _Handler(self), str(self.target), recursive=False
        )
        self._parent: ObservedWatch | None = None
        if self.configured.is_symlink() or self.configured.parent != self.target.parent:
            with contextlib.suppress(OSError):
                self._parent = self._observer.schedule(
                    _ParentHandler(self), str(self.configured.parent), recursive=False
                )
        self._thread = threading.Thread(target=self._settle_loop, name="axme-fw-rules-settle")

    def start(self) -> None:
        self._observer.daemon = True
        self._observer.start()
        self._thread.daemon = True
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify_all()
        self._observer.stop()
        self._observer.join(timeout=2)
        self._thread.join(timeout=2)

    # ------------------------------------------------------------ watchdog's thread

    def _event(self, event: FileSystemEvent) -> None:
        if isinstance(event, EventsLostEvent):
            self._hand_on(frozenset({ALL}))  # inotify's queue overflowed: trust nothing
            return
        if isinstance(event, DirModifiedEvent | FileOpenedEvent | FileClosedNoWriteEvent):
            return  # the directory's own mtime, or a read (ours included)
        src = event.src_path
        dest = getattr(event, "dest_path", "") or ""
        names = [_name(p) for p in (src, dest) if p]
        if any(n.startswith("..") for n in names) or event.is_directory or self._is_link(dest):
            self._hand_on(frozenset({ALL}))  # a ConfigMap swap or a subdirectory change
            return
        if isinstance(event, FileMovedEvent):
            done = [n for n in names if is_rules_file(n)]
            with self._lock:
                for n in done:
                    self._waiting.pop(n, None)
            if done:
                self._hand_on(frozenset(done))
            return
        name = _name(src)
        if not is_rules_file(name):
            return
        if isinstance(event, FileDeletedEvent):
            with self._lock:
                self._waiting.pop(name, None)
            self._hand_on(frozenset({name}))
        elif isinstance(event, FileClosedEvent):
            self._wait(name, SETTLE, rehash=True)
        elif isinstance(event, FileCreatedEvent | FileModifiedEvent):
            if self._is_link(src):
                self._hand_on(frozenset({name}))  # a symlink is whole when it appears
            else:
                self._wait(name, QUIET, rehash=True)

    def _is_link(self, path: str | bytes) -> bool:
        return bool(path) and os.path.islink(path)

    def _wait(self, name: str, delay: float, rehash: bool) -> None:
        with self._lock:
            p = self._waiting.get(name)
            if p is None:
                p = self._waiting[name] = _Pending(0.0)
            p.due = time.monotonic() + delay
            if rehash:
                p.digest = False  # a new write: two fresh reads must agree
            self._lock.notify_all()

    # ------------------------------------------------------------ the settle thread

    def _settle_loop(self) -> None:
        next_target_check = time.monotonic() + TARGET_CHECK
        while True:
            ready: list[str] = []
            with self._lock:
                if self._stopped:
                    return
                now = time.monotonic()
                due = [n for n, p in self._waiting.items() if p.due <= now]
                wake = min([p.due for p in self._waiting.values()] + [next_target_check])
                if not due and wake > now:
                    self._lock.wait(wake - now)
                    continue
            for name in due:
                digest = _digest(self.target / name)
                with self._lock:
                    p = self._waiting.get(name)
                    if p is None or p.due > time.monotonic():
                        continue  # written again meanwhile: wait on
                    if p.digest is not False and p.digest == digest:
                        del self._waiting[name]
                        ready.append(name)
                    else:
                        p.digest, p.due = digest, time.monotonic() + SETTLE
            if ready:
                self._hand_on(frozenset(ready))
            if time.monotonic() >= next_target_check:
                next_target_check = time.monotonic() + TARGET_CHECK
                self._check_target()

    def _check_target(self) -> None:
        """Move the watch when the rules directory (a symlink) points somewhere new."""
        try:
            target = self.configured.resolve()
        except OSError:
            return
        with self._lock:
            if target == self.target or not target.is_dir():
                return
            old, self.target = self._watch, target
        log.info("axme-fw: rules directory %s now points to %s", self.configured, target)
        if old is not None:
            with contextlib.suppress(KeyError, OSError):
                self._observer.unschedule(old)
        try:
            self._watch = self._observer.schedule(_Handler(self), str(target), recursive=False)
        except OSError:
            log.exception("axme-fw: cannot watch %s", target)
            self._watch = None
        self._hand_on(frozenset({ALL}))

    # ------------------------------------------------------------ to the loop

    def _hand_on(self, names: frozenset[str]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
            self._loop.call_soon_threadsafe(self._fire, names)

    def _fire(self, names: frozenset[str]) -> None:
        first = not self._pending_names
        self._pending_names |= names
        if first:
            self._loop.call_soon(self._run)

    def _run(self) -> None:
        names, self._pending_names = frozenset(self._pending_names), set()
        self._on_change(names)
