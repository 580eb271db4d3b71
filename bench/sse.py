"""Section ``sse``: time to first and last byte of an LLM-shaped event stream."""

from __future__ import annotations

import asyncio
import json
import statistics
import time

from .common import HOST, Deadline, ratio
from .fixtures import BENCH, Cred
from .report import Row
from .rig import Proxy, Rig
from .upstream import SSE_EVENTS, SSE_INTERVAL
from .wire import HttpError, parse_head, proxied_get


async def sse_once(
    proxy: Proxy, target: str, cred: Cred, timeout: float = 10
) -> tuple[float, float]:
    """POST a streaming chat completion; (first event, [DONE]) in ms from sending."""
    body = json.dumps(
        {
            "model": "gpt-4o-mini",
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "count to twenty"}],
        }
    ).encode()
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, proxy.port), timeout)
    try:
        req = proxied_get(target, "/v1/chat/completions", cred.auth, "POST", body)
        t0 = time.perf_counter()
        writer.write(req)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        status, _ = parse_head(head)
        if status != 200:
            raise HttpError(f"SSE through {proxy.name}: status {status}")
        seen = b""
        first = 0.0
        deadline = Deadline(timeout)
        while b"[DONE]" not in seen:
            data = await asyncio.wait_for(reader.read(65536), deadline.left() + 0.001)
            if not data:
                raise HttpError(f"SSE through {proxy.name}: closed early")
            seen += data
            if not first and b"data:" in seen:
                first = time.perf_counter()
        last = time.perf_counter()
    finally:
        writer.close()
    return (first - t0) * 1000, (last - t0) * 1000


async def run(rig: Rig) -> None:
    """Time to first event and last byte of a streamed chat completion, a vs b."""
    bare = await rig.bare("bare-stream", stream_sse=True)
    fw = await rig.firewall("fw", rig.sizes.agents)
    samples: dict[str, list[tuple[float, float]]] = {"bare": [], "fw": []}
    for _ in range(rig.sizes.sse_trials):
        for name, proxy in (("bare", bare), ("fw", fw)):
            samples[name].append(await sse_once(proxy, rig.target, BENCH))
        if rig.deadline.passed() and len(samples["fw"]) >= 2:
            break
    med = {
        name: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v))
        for name, v in samples.items()
    }
    rig.details["sse"] = {"samples_ms": samples, "median_ms": med}
    note = (
        f"{SSE_EVENTS} events every {SSE_INTERVAL * 1000:.0f} ms + usage; baseline is bare "
        "mitmdump with a 3-line addon setting response.stream for text/event-stream "
        f"(without it mitmdump buffers the whole stream); median of {len(samples['fw'])}"
    )
    for i, what in enumerate(("time to first event", "time to last byte")):
        r = ratio(med["bare"][i], med["fw"][i])
        rig.add(
            Row(
                "sse",
                what,
                "ms",
                med["bare"][i],
                med["fw"][i],
                ratio=r,
                goal="≤ 1.05",
                ok=r is not None and r <= 1.05,
                note=note,
            )
        )
    await rig.stop_proxy("bare-stream")
