"""Shared rig: the bench's own HTTP/1.1 client bits (requests in proxy form, CONNECT + TLS)."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

from .common import HOST


class HttpError(Exception):
    """A response the bench cannot use: a bad status line, a refused tunnel."""


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise HttpError(f"bad status line {lines[0]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        key, sep, value = line.partition(":")
        if sep:
            headers[key.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """Read one response: status, headers, body (Content-Length, chunked or to EOF)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status, headers = parse_head(head)
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(chunks)
    elif status in (204, 304) or 100 <= status < 200:
        body = b""
    else:
        body = await reader.read()
    return status, headers, body


def proxied_get(target: str, path: str, auth: str, method: str = "GET", body: bytes = b"") -> bytes:
    """A request in absolute form for an HTTP proxy."""
    extra = f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n" if body else ""
    return (
        f"{method} http://{target}{path} HTTP/1.1\r\nHost: {target}\r\n"
        f"Proxy-Authorization: {auth}\r\n{extra}\r\n"
    ).encode() + body


def origin_get(target: str, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()


async def open_tunnel(
    proxy_port: int, target: str, auth: str, ca: Path, timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """CONNECT through the proxy, then TLS (HTTP/1.1 only) trusting the proxy's CA."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, proxy_port), timeout)
    writer.write(
        f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
        f"Proxy-Authorization: {auth}\r\n\r\n".encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    status, _ = parse_head(head)
    if status != 200:
        writer.close()
        raise HttpError(f"CONNECT {target}: {status}")
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.set_alpn_protocols(["http/1.1"])
    await asyncio.wait_for(writer.start_tls(ctx, server_hostname=target.split(":")[0]), timeout)
    return reader, writer
