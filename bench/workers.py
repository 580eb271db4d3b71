"""Helper processes: the keep-alive load generator and the kill worker (client side).

Started by the rig as ``python -m bench _load ...`` and ``python -m bench _killworker ...``;
each prints its results on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import socket
import ssl
import sys
import time
from pathlib import Path

from .common import HOST, basic_auth, now_ns, pct
from .wire import HttpError, open_tunnel, origin_get, parse_head, proxied_get, read_response


async def load_main(args: argparse.Namespace) -> None:
    """Keep-alive load through a proxy (plain: absolute-form; https: CONNECT + TLS)."""
    auth = basic_auth(args.agent, args.token)
    target = args.target
    lat: list[float] = []
    errors = 0
    count = 0
    start = time.monotonic()
    measure_from = start + args.warmup
    stop_at = measure_from + args.duration
    hard_stop = stop_at + 10.0

    async def conn_loop() -> None:
        nonlocal errors, count
        while time.monotonic() < stop_at and count < args.max_requests:
            try:
                if args.mode == "https":
                    reader, writer = await open_tunnel(
                        args.proxy_port, target, auth, Path(args.ca), 10.0
                    )
                    req = origin_get(target, "/")
                else:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(HOST, args.proxy_port), 10.0
                    )
                    req = proxied_get(target, "/", auth)
                while True:
                    now = time.monotonic()
                    if now >= stop_at or count >= args.max_requests:
                        break
                    t0 = time.perf_counter()
                    writer.write(req)
                    status, headers, _ = await asyncio.wait_for(read_response(reader), 10.0)
                    t1 = time.perf_counter()
                    if status != 200:
                        errors += 1
                    elif now >= measure_from:
                        lat.append(t1 - t0)
                        count += 1
                    if headers.get("connection", "").lower() == "close":
                        break
                writer.close()
            except (OSError, HttpError, asyncio.IncompleteReadError, TimeoutError, ssl.SSLError):
                errors += 1
                if time.monotonic() > hard_stop or errors > 1000:
                    return
                await asyncio.sleep(0.01)

    await asyncio.gather(*(conn_loop() for _ in range(args.conns)))
    elapsed = min(time.monotonic(), stop_at) - measure_from
    print(
        json.dumps(
            {
                "requests": count,
                "errors": errors,
                "seconds": elapsed,
                "rps": count / elapsed if elapsed > 0 else 0.0,
                "p50_ms": pct(lat, 50) * 1000,
                "p99_ms": pct(lat, 99) * 1000,
            }
        ),
        flush=True,
    )


def killworker_main(args: argparse.Namespace) -> None:
    """Send requests continuously on one keep-alive connection; print status changes.

    Lines on stdout: ``S STATUS T_NS`` when the status changes, ``E T_NS`` on a
    connection error (the proxy cuts in-flight work of a killed agent). Stops at the
    deadline, when stdin closes or when the parent dies.
    """
    target = f"{HOST}:{args.up_port}"
    req = proxied_get(target, "/work", basic_auth(args.agent, args.token))
    stop_at = time.monotonic() + args.seconds
    last = 0
    sock: socket.socket | None = None
    buf = b""
    out = sys.stdout
    while time.monotonic() < stop_at:
        if select.select([0], [], [], 0)[0] and not os.read(0, 1):
            return  # the parent closed our stdin
        try:
            if sock is None:
                sock = socket.create_connection((HOST, args.proxy_port), timeout=5)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                buf = b""
            sock.sendall(req)
            while b"\r\n\r\n" not in buf:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("closed")
                buf += data
            end = buf.index(b"\r\n\r\n")
            status, headers = parse_head(buf[:end])
            t = now_ns()
            need = end + 4 + int(headers.get("content-length", "0"))
            while len(buf) < need:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("closed")
                buf += data
            buf = buf[need:]
            if status != last:
                last = status
                out.write(f"S {status} {t}\n")
                out.flush()
            if headers.get("connection", "").lower() == "close":
                sock.close()
                sock = None
        except (OSError, HttpError, ValueError):
            out.write(f"E {now_ns()}\n")
            out.flush()
            if sock is not None:
                sock.close()
            sock = None
            time.sleep(0.001)


def load_cli(argv: list[str]) -> int:
    """``_load --proxy-port P --target HOST:PORT --mode http|https ...``."""
    p = argparse.ArgumentParser(prog="bench _load")
    p.add_argument("--proxy-port", type=int, required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--mode", choices=("http", "https"), required=True)
    p.add_argument("--conns", type=int, default=8)
    p.add_argument("--duration", type=float, default=5)
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--max-requests", type=int, default=100000)
    p.add_argument("--agent", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--ca", default="")
    asyncio.run(load_main(p.parse_args(argv)))
    return 0


def killworker_cli(argv: list[str]) -> int:
    """``_killworker --proxy-port P --up-port U --agent A --token T [--seconds S]``."""
    p = argparse.ArgumentParser(prog="bench _killworker")
    p.add_argument("--proxy-port", type=int, required=True)
    p.add_argument("--up-port", type=int, required=True)
    p.add_argument("--agent", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--seconds", type=float, default=300)
    killworker_main(p.parse_args(argv))
    return 0
