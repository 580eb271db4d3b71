"""Section ``park``: ``axme-fw pause``, N parked requests, ``axme-fw resume``, in order."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

from .common import FULL, HOST, MS, Deadline, lis_length, now_ns, rss_kib, wait_until
from .fixtures import PARKER, write_kill_file
from .report import Row
from .rig import Rig
from .wire import HttpError, proxied_get, read_response


class AuditCounter:
    """Counts ``decision`` records with verdict ``park`` appended to the audit log."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self.partial = b""
        self.parked = 0

    def poll(self) -> int:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return self.parked
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            if b'"decision"' in line and b'"park"' in line:
                with contextlib.suppress(ValueError):
                    rec = json.loads(line)
                    if rec.get("event") == "decision" and rec.get("verdict") == "park":
                        self.parked += 1
        return self.parked


async def run(rig: Rig) -> None:
    """Pause, N parked requests, resume: release time, arrival order, RSS per parked flow."""
    s = rig.sizes
    fw = await rig.firewall("fw", s.agents)
    assert fw.state is not None
    n = s.park_flows
    na = "not available"
    status, _ = await rig.request(fw, PARKER)
    if status != 200:
        raise RuntimeError(f"park agent refused before pause: {status}")
    counter = AuditCounter(fw.state / "audit.jsonl")
    code, out = await rig.cli(fw, "pause", PARKER.agent, "--reason", "bench")
    if code != 0:
        rig.add(Row("park", "parked flows", "", None, None, note=f"{na}: pause failed: {out}"))
        return
    rss0 = rss_kib(fw.pid)
    await rig.upstream_order()  # clears the upstream's record
    results: list[int] = [0] * n
    done_ns: list[int] = [0] * n
    conns: list[asyncio.StreamWriter] = []
    budget = Deadline(120 if s is FULL else 25)

    async def collect(i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            st, _, _ = await asyncio.wait_for(read_response(reader), budget.left() + 60)
            results[i] = st
            done_ns[i] = now_ns()
        except (OSError, TimeoutError, HttpError, asyncio.IncompleteReadError):
            results[i] = -2
        finally:
            writer.close()

    tasks: list[asyncio.Task[None]] = []
    try:
        t_fire = time.monotonic()
        for i in range(n):  # strictly in order: request i is written before i+1 connects
            if budget.passed():
                break
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(HOST, fw.port), budget.left() + 0.001
                )
                conns.append(writer)
                writer.write(proxied_get(rig.target, f"/park/{i}", PARKER.auth))
                await writer.drain()
            except (OSError, TimeoutError):
                results[i] = -1
                break
            tasks.append(asyncio.ensure_future(collect(i, reader, writer)))
        fired = len(tasks)
        fire_s = time.monotonic() - t_fire

        def all_parked() -> bool:
            return counter.poll() + sum(1 for r in results[:fired] if r != 0) >= fired

        with contextlib.suppress(TimeoutError):
            await wait_until(all_parked, max(budget.left(), 5), "parked flows", step=0.05)
        parked = counter.poll()
        early = sum(1 for r in results[:fired] if r != 0)
        leaked = len((await rig.upstream_order())["order"])
        rss1 = rss_kib(fw.pid)
        if leaked > fired // 2:
            rig.add(
                Row(
                    "park",
                    "parked flows",
                    "",
                    None,
                    None,
                    note=f"{na}: {leaked} of {fired} requests reached upstream while paused",
                )
            )
            return
        t0 = now_ns()
        code, out = await rig.cli(fw, "resume", PARKER.agent, "--reason", "bench")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*tasks, return_exceptions=True), 60 if s is FULL else 20
            )
        answered = [i for i in range(fired) if done_ns[i] >= t0]
        last_client = max((done_ns[i] for i in answered), default=0)
        order_data = await rig.upstream_order()
        order: list[int] = order_data["order"]
        in_order = sorted(order)
        out_of_place = sum(1 for got, want in zip(order, in_order, strict=True) if got != want)
        displaced = len(order) - lis_length(order)
        ok200 = sum(1 for i in answered if results[i] == 200)
        to_upstream_ms = (order_data["last_ns"] - t0) / MS if order_data["last_ns"] else None
        to_client_ms = (last_client - t0) / MS if last_client else None
        detail = {
            "fired": fired,
            "fire_seconds": round(fire_s, 2),
            "parked_per_audit": parked,
            "answered_before_resume": early,
            "reached_upstream_while_paused": leaked,
            "answered_after_resume": len(answered),
            "answered_200": ok200,
            "reached_upstream": len(order),
            "out_of_place": out_of_place,
            "displaced_min_moves": displaced,
            "release_to_last_upstream_ms": to_upstream_ms,
            "release_to_first_upstream_ms": (order_data["first_ns"] - t0) / MS
            if order_data["first_ns"]
            else None,
            "release_to_last_client_ms": to_client_ms,
            "rss_before_kib": rss0,
            "rss_parked_kib": rss1,
            "resume_cli": out.strip(),
        }
        rig.details["park"] = detail
        note = (
            f"{fired} requests, one connection each, sent in order; {parked} parked per the "
            f"audit log, {leaked} reached upstream while paused, {ok200} answered 200 after "
            f"resume; arrival order compared with send order ({displaced} would have to "
            "move)"
        )
        rig.add(
            Row(
                "park",
                "resume → all released (last upstream arrival)",
                "ms",
                None,
                to_upstream_ms,
                note=note,
            )
        )
        rig.add(
            Row(
                "park",
                "resume → all answered (last client response)",
                "ms",
                None,
                to_client_ms,
            )
        )
        rig.add(
            Row(
                "park",
                f"out of place at upstream (of {len(order)})",
                "",
                None,
                float(out_of_place),
                goal="0 (released in order)",
                ok=out_of_place == 0 and len(order) == fired,
            )
        )
        rig.add(
            Row(
                "park",
                "proxy RSS per parked flow",
                "KiB",
                None,
                (rss1 - rss0) / max(parked or fired, 1),
            )
        )
    finally:
        for t in tasks:
            t.cancel()
        for w in conns:
            w.close()
        if fw.rules is not None:
            write_kill_file(fw.rules, [])
