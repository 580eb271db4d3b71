"""Section ``reload``: from renaming a 10,000-agent rules file into place to the rule enforced."""

from __future__ import annotations

import asyncio
import os
import statistics

from .common import HOST, MS, Deadline, now_ns
from .fixtures import Cred, write_agents_file
from .report import Row
from .rig import Rig
from .wire import proxied_get, read_response


async def run(rig: Rig) -> None:
    """Rename of a 10,000-agent file adding one agent → that agent gets through."""
    s = rig.sizes
    big = await rig.firewall("fw10k", s.big_agents)
    assert big.rules is not None
    times: list[float] = []
    added: list[Cred] = []
    for k in range(s.reload_trials):
        if rig.deadline.passed() and times:
            break
        cred = Cred(f"fresh{k:03d}", f"fresh-token-{k}")
        reader, writer = await asyncio.open_connection(HOST, big.port)
        try:
            req = proxied_get(rig.target, "/", cred.auth)
            writer.write(req)
            status, _, _ = await asyncio.wait_for(read_response(reader), 10)
            if status != 403:
                raise RuntimeError(f"{cred.agent} not refused before the edit: {status}")
            # Prepare the edited file (agents - 3 generated + the new ones), then rename.
            path = big.rules / "agents.yaml"
            tmp = path.with_name("agents.prep")
            write_agents_file(tmp, s.big_agents - 3, s.actions, [*added, cred])
            t0 = now_ns()
            os.rename(tmp, path)
            deadline = Deadline(30)
            while True:
                writer.write(req)
                status, headers, _ = await asyncio.wait_for(read_response(reader), 10)
                if status == 200:
                    break
                if deadline.passed():
                    raise TimeoutError(f"new agent {cred.agent} still refused after 30 s")
                if headers.get("connection", "").lower() == "close":
                    writer.close()
                    reader, writer = await asyncio.open_connection(HOST, big.port)
            times.append((now_ns() - t0) / MS)
            added.append(cred)
        finally:
            writer.close()
    rig.details["reload"] = {"ms": times}
    rig.add(
        Row(
            "reload",
            f"edit (rename) of a {s.big_agents:,}-agent file → enforced, median",
            "ms",
            None,
            statistics.median(times),
            note=f"{len(times)} edits, each adding one agent; a client of the new agent "
            "polls until it gets through",
        )
    )
    rig.add(Row("reload", "… max", "ms", None, max(times)))
