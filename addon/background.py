"""Loop helper: fire-and-forget coroutines, kept alive until done, their errors logged.

asyncio keeps only a weak reference to a task: one nobody holds may vanish mid-flight.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger(__name__)

_running: set[asyncio.Task[Any]] = set()


def spawn(coro: Coroutine[Any, Any, Any], what: str) -> asyncio.Task[Any]:
    """Run ``coro`` on the running loop; log (never raise) what it raises."""
    task = asyncio.get_running_loop().create_task(coro)
    _running.add(task)

    def done(t: asyncio.Task[Any]) -> None:
        _running.discard(t)
        if not t.cancelled() and t.exception() is not None:
            log.error("axme-fw: %s failed", what, exc_info=t.exception())

    task.add_done_callback(done)
    return task


async def drain(timeout: float) -> None:
    """Wait up to ``timeout`` s for what was spawned (shutdown: settlements land first)."""
    if _running:
        await asyncio.wait(list(_running), timeout=timeout)
