"""Runtime facts the proxy shares with the CLI through the state directory.

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
