"""Shared rig: a crowd of kill-worker processes (instances of one agent) and what they saw.

Used by ``kill`` (4 instances through one proxy) and ``fleet`` (4 instances spread over
3 replicas). Each worker is ``python -m bench _killworker``; it reports every status
change with a CLOCK_MONOTONIC time, which :class:`Crowd` follows.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .fixtures import Cred
from .rig import Proxy, Rig


@dataclass
class Worker:
    """One kill-worker process as its stdout reports it: status, since when, errors."""

    proc: asyncio.subprocess.Process
    proxy: str = ""
    status: int = 0
    since: int = 0
    errors: int = 0
    history: list[tuple[int, int]] = field(default_factory=list)
    error_ns: list[int] = field(default_factory=list)

    def stopped_at(self, t0: int) -> int:
        """When this instance was first stopped after ``t0``: a 403 or a cut connection."""
        cut = [t for t in self.error_ns if t >= t0]
        return min([self.since, *cut]) if cut else self.since


def seen_since(status: int, since: int, w: Worker) -> bool:
    """``w`` has had ``status`` since ``since`` (ns) or later."""
    return w.status == status and w.since >= since


class Crowd:
    """Kill workers of one agent, one per proxy in ``proxies`` (a proxy may repeat)."""

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.workers: list[Worker] = []
        self.changed = asyncio.Condition()
        self._followers: list[asyncio.Future[None]] = []

    async def start(self, proxies: Sequence[Proxy], cred: Cred, seconds: float) -> None:
        """Start one worker per entry of ``proxies``; each sends for ``seconds`` at most."""
        for proxy in proxies:
            proc = await self.rig.procs.helper(
                "_killworker",
                "--proxy-port",
                str(proxy.port),
                "--up-port",
                str(self.rig.up_http),
                "--agent",
                cred.agent,
                "--token",
                cred.token,
                "--seconds",
                str(seconds),
                pipe_in=True,
            )
            w = Worker(proc, proxy.name)
            self.workers.append(w)
            self._followers.append(asyncio.ensure_future(self._follow(w)))

    async def _follow(self, w: Worker) -> None:
        assert w.proc.stdout is not None
        async for line in w.proc.stdout:
            parts = line.split()
            if parts and parts[0] == b"S":
                w.status, w.since = int(parts[1]), int(parts[2])
                w.history.append((w.status, w.since))
            elif parts and parts[0] == b"E":
                w.errors += 1
                w.error_ns.append(int(parts[1]))
            async with self.changed:
                self.changed.notify_all()

    async def wait_all(self, pred: Callable[[Worker], bool], timeout: float, what: str) -> None:
        """Until ``pred`` holds for every worker; TimeoutError naming ``what`` and states."""
        async with self.changed:
            try:
                await asyncio.wait_for(
                    self.changed.wait_for(lambda: all(map(pred, self.workers))), timeout
                )
            except TimeoutError:
                states = [(w.proxy, w.status, w.errors) for w in self.workers]
                raise TimeoutError(f"{what}: workers (proxy, status, errors) {states}") from None

    def last_since(self) -> int:
        """When the last worker's current status began (ns)."""
        return max(w.since for w in self.workers)

    def first_since(self) -> int:
        return min(w.since for w in self.workers)

    async def stop(self) -> None:
        """Close every worker's stdin (it exits), then stop the processes."""
        for w in self.workers:
            if w.proc.stdin is not None:
                with contextlib.suppress(Exception):
                    w.proc.stdin.close()
        for w in self.workers:
            await self.rig.procs.stop(w.proc)
        for f in self._followers:
            f.cancel()
