"""Shared rig: the bench's own redis-server (loopback, free port, no persistence) and its
command counters, for the sections whose firewalls share state through ``--redis``."""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass
from typing import Any

from .common import HOST, free_port, wait_until
from .rig import Rig

# Commands the bench itself sends to read the counters (not the firewall's).
OWN = frozenset({"info", "ping", "config|resetstat", "config"})


@dataclass
class RedisServer:
    """A running redis-server started by the bench, and a client to it."""

    proc: asyncio.subprocess.Process
    port: int
    client: Any  # redis.Redis (imported lazily, as the sections do)

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def commands(self) -> dict[str, int]:
        """Calls per command so far (``INFO commandstats``), less the bench's own reads."""
        stats: dict[str, Any] = self.client.info("commandstats")
        out: dict[str, int] = {}
        for key, value in stats.items():
            name = key.removeprefix("cmdstat_")
            if name not in OWN:
                out[name] = int(value["calls"])
        return out


async def start_redis(rig: Rig, name: str) -> RedisServer | None:
    """Start redis-server on a free loopback port, persistence off; None if not installed."""
    exe = shutil.which("redis-server")
    if exe is None:
        return None
    import redis

    port = free_port()
    conf = rig.workdir / name
    conf.mkdir(exist_ok=True)
    args = [exe, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"]
    args += ["--dir", str(conf)]
    proc = await rig.procs.start(args, log=rig.workdir / f"{name}.log")
    client = redis.Redis(host=HOST, port=port, socket_timeout=2.0)

    def pings() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    await wait_until(pings, 10, f"redis-server {name}", step=0.02)
    return RedisServer(proc, port, client)


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Calls per command between two :meth:`RedisServer.commands` readings (non-zero only)."""
    out = {k: v - before.get(k, 0) for k, v in after.items()}
    return {k: v for k, v in sorted(out.items()) if v}
