"""Watch the rules directory with watchdog (inotify) and call back on the event loop.

Watch the directory, not the files: editors save by writing a temp file and renaming
it over the original, ``cp`` writes in place, ``mv`` renames. A half-written file
emits "modified" events, so only close-after-write, create, move and delete count.
The callback runs on the asyncio loop (``call_soon_threadsafe``), never on
watchdog's thread, and is coalesced: a burst of events schedules one call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from watchdog.events import (
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

log = logging.getLogger(__name__)

_RELEVANT = (FileClosedEvent, FileCreatedEvent, FileDeletedEvent, FileMovedEvent)


def is_rules_file(path: str | bytes) -> bool:
    name = Path(path if isinstance(path, str) else path.decode()).name
    return name.endswith(".yaml") and not name.startswith(".")


class _Handler(FileSystemEventHandler):
    def __init__(self, notify: Callable[[frozenset[str]], None]) -> None:
        self._notify = notify

    def on_any_event(self, event: FileSystemEvent) -> None:
        if not isinstance(event, _RELEVANT):
            return
        paths = [event.src_path, getattr(event, "dest_path", "") or ""]
        names = frozenset(_name(p) for p in paths if p and is_rules_file(p))
        if names:
            self._notify(names)


def _name(path: str | bytes) -> str:
    return Path(path if isinstance(path, str) else path.decode()).name


class RulesWatcher:
    """Calls ``on_change(names)`` on ``loop`` after changes in ``directory``; ``names`` are the
    file names changed since the previous call (coalesced)."""

    def __init__(
        self,
        directory: Path,
        loop: asyncio.AbstractEventLoop,
        on_change: Callable[[frozenset[str]], None],
    ) -> None:
        self._loop = loop
        self._on_change = on_change
        self._pending: set[str] = set()
        self._observer = Observer()
        self._observer.schedule(_Handler(self._from_thread), str(directory), recursive=False)

    def start(self) -> None:
        self._observer.daemon = True
        self._observer.start()

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join(timeout=2)

    def _from_thread(self, names: frozenset[str]) -> None:
        # Called on watchdog's thread: only hop; never touch proxy state here.
        with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
            self._loop.call_soon_threadsafe(self._fire, names)

    def _fire(self, names: frozenset[str]) -> None:
        first = not self._pending
        self._pending |= names
        if first:
            self._loop.call_soon(self._run)

    def _run(self) -> None:
        names, self._pending = frozenset(self._pending), set()
        self._on_change(names)
