"""Shared rig: the bench's own redis-server (loopback, free port, no persistence), for the
sections whose firewalls share state through ``--redis``, and a MONITOR that counts the
commands it runs."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from typing import Any

from .common import HOST, free_port, wait_until
from .rig import Rig


@dataclass
class RedisServer:
    """A running redis-server started by the bench, and a client to it."""

    proc: asyncio.subprocess.Process
    port: int
    client: Any  # redis.Redis (imported lazily, as the sections do)

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"


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


class Monitor:
    """Every command the server runs while open (``MONITOR``), counted by source and name.

    ``client``: sent by a client (one round trip each, except inside MULTI/EXEC);
    ``lua``: run by a script (EVALSHA) inside the server, no round trip. :meth:`close`
    fences with an ECHO of its own, so every command before it is counted.
    """

    def __init__(self, server: RedisServer) -> None:
        self.server = server
        self.counts: Counter[tuple[str, str]] = Counter()
        self._fence = "axme-bench-fence-" + os.urandom(4).hex()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(HOST, self.server.port, limit=2**24), 10
        )
        self._reader, self._writer = reader, writer
        writer.write(b"MONITOR\r\n")
        line = await asyncio.wait_for(reader.readline(), 10)
        if not line.startswith(b"+OK"):
            raise RuntimeError(f"MONITOR refused: {line!r}")

    async def close(self, timeout: float = 30) -> Counter[tuple[str, str]]:
        """Fence, read every line up to the fence, close; the counts."""
        assert self._reader is not None and self._writer is not None
        await asyncio.to_thread(self.server.client.echo, self._fence)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    line = (await self._reader.readline()).decode(errors="replace")
                    if not line:
                        raise RuntimeError("MONITOR connection closed")
                    if self._fence in line:
                        break
                    self._count(line)
        finally:
            self._writer.close()
        return self.counts

    def _count(self, line: str) -> None:
        # +1700000000.123456 [0 127.0.0.1:54321] "EVALSHA" "..." ...   ([0 lua] from scripts)
        left, right = line.find("["), line.find("]")
        if left < 0 or right < left:
            return
        source = line[left + 1 : right].split(" ", 1)[-1]
        name = line[right + 1 :].strip().split(" ", 1)[0].strip('"').lower()
        self.counts["lua" if source == "lua" else "client", name] += 1
