"""State: runtime facts the proxy shares with the CLI through the state directory.

The proxy owns these files and writes them atomically off the event loop; the CLI
only reads them. ``live.json`` is a snapshot (parked flows, instances, usage)
refreshed a few times a second while something changes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LIVE_FILE = "live.json"


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when missing or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_live(state_dir: Path) -> dict[str, Any] | None:
    return read_json(state_dir / LIVE_FILE)


class Snapshots:
    """The durable copy of per-agent counters (TinyDB in ``state/state.json``).

    Not thread-safe and blocking: the proxy calls it only from its one state-writer
    thread (and once, synchronously, at start-up before traffic flows).
    """

    def __init__(self, state_dir: Path) -> None:
        from tinydb import TinyDB

        self.path = state_dir / STORE_FILE
        self._db = TinyDB(self.path, storage=_AtomicJSONStorage)

    def load(self, name: str) -> dict[str, Any] | None:
        doc = self._db.table("snapshots").get(doc_id=_DOC_IDS[name])
        return dict(doc["data"]) if doc is not None and isinstance(doc.get("data"), dict) else None

    def save(self, name: str, data: dict[str, Any]) -> None:
        from tinydb.table import Document

        self._db.table("snapshots").upsert(Document({"data": data}, doc_id=_DOC_IDS[name]))

    def close(self) -> None:
        self._db.close()


STORE_FILE = "state.json"
_DOC_IDS = {"windows": 1, "health": 2}


def _make_storage() -> type:
    from tinydb.storages import JSONStorage

    from .rules import atomic_write

    class AtomicJSONStorage(JSONStorage):
        """TinyDB's JSON storage, but written to a temp file and renamed into place,
        so a crash mid-write leaves the previous copy, never a torn file."""

        def __init__(self, path: str, **kwargs: Any) -> None:
            super().__init__(path, **kwargs)
            self._target = Path(path)

        def read(self) -> dict[str, Any] | None:
            # Missing or unreadable: start empty (restore then errs on nothing known).
            return read_json(self._target)

        def write(self, data: dict[str, Any]) -> None:
            atomic_write(self._target, json.dumps(data))

    return AtomicJSONStorage


_AtomicJSONStorage = _make_storage()
