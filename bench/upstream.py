"""Helper process: the loopback upstream (fixed answers, an LLM-shaped SSE stream, park order).

Started by the rig as ``python -m bench _upstream --cert C --key K``; prints
``READY HTTP_PORT HTTPS_PORT`` and serves until its stdin closes or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import ssl
import sys

from .common import HOST, now_ns

PAD = b'{"id":"bench","object":"result","ok":true,"pad":"' + b"x" * 64 + b'"}\n'
PLAIN_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    + f"Content-Length: {len(PAD)}\r\n\r\n".encode()
    + PAD
)
SSE_EVENTS = 20
SSE_INTERVAL = 0.020


def sse_event(i: int) -> bytes:
    chunk = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": {"content": f"token{i} "}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


SSE_USAGE = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":12,'
    b'"completion_tokens":20,"total_tokens":32}}\n\ndata: [DONE]\n\n'
)


class Upstream:
    """State of the upstream server: arrival order of /park/N requests."""

    def __init__(self) -> None:
        self.order: list[int] = []
        self.first_ns = 0
        self.last_ns = 0


class UpstreamProtocol(asyncio.Protocol):
    """A minimal keep-alive HTTP/1.1 server: fixed answers, SSE, park order."""

    def __init__(self, state: Upstream) -> None:
        self.state = state
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.streaming = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.transport is not None and not self.streaming:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end]
            length = 0
            m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            if m:
                length = int(m.group(1))
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length :]
            target = head.split(b" ", 2)[1]
            path = target.split(b"://", 1)[-1] if b"://" in target else target
            if b"://" in target:
                path = b"/" + path.split(b"/", 1)[1] if b"/" in path else b"/"
            self.handle(path)

    def handle(self, path: bytes) -> None:
        assert self.transport is not None
        if path.startswith(b"/park/"):
            t = now_ns()
            if not self.state.order:
                self.state.first_ns = t
            self.state.last_ns = t
            self.state.order.append(int(path[6:]))
            self.transport.write(PLAIN_RESPONSE)
        elif path.startswith(b"/v1/chat/completions") or path.startswith(b"/sse"):
            self.streaming = True
            asyncio.get_running_loop().create_task(self.sse())
        elif path == b"/_order":
            body = json.dumps(
                {
                    "order": self.state.order,
                    "first_ns": self.state.first_ns,
                    "last_ns": self.state.last_ns,
                }
            ).encode()
            self.state.order = []
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
        else:
            self.transport.write(PLAIN_RESPONSE)

    async def sse(self) -> None:
        t = self.transport
        assert t is not None

        def chunk(data: bytes) -> bytes:
            return f"{len(data):x}\r\n".encode() + data + b"\r\n"

        t.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        for i in range(SSE_EVENTS):
            await asyncio.sleep(SSE_INTERVAL)  # the upstream's pace, not a wait of the rig
            if t.is_closing():
                return
            t.write(chunk(sse_event(i)))
        await asyncio.sleep(SSE_INTERVAL)
        if not t.is_closing():
            t.write(chunk(SSE_USAGE) + b"0\r\n\r\n")
        self.streaming = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def upstream_main(cert: str, key: str) -> None:
    state = Upstream()
    loop = asyncio.get_running_loop()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    plain = await loop.create_server(lambda: UpstreamProtocol(state), HOST, 0, backlog=4096)
    tls = await loop.create_server(lambda: UpstreamProtocol(state), HOST, 0, ssl=ctx, backlog=4096)
    ports = [s.getsockname()[1] for srv in (plain, tls) for s in srv.sockets][:2]
    print(f"READY {ports[0]} {ports[1]}", flush=True)
    # Serve until stdin closes (the benchmark ended) or SIGTERM.
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    eof = asyncio.ensure_future(reader.read())
    await asyncio.wait([eof, asyncio.ensure_future(stop.wait())], return_when="FIRST_COMPLETED")


def main(argv: list[str]) -> int:
    """``_upstream --cert C --key K``."""
    p = argparse.ArgumentParser(prog="bench _upstream")
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    a = p.parse_args(argv)
    asyncio.run(upstream_main(a.cert, a.key))
    return 0
