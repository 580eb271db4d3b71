"""End-to-end rig: real upstream servers, a real `axme-fw run` process, real clients.

Everything listens on 127.0.0.1 on free ports. Nothing waits by guessing: every
wait is a condition polled against a deadline (:func:`wait_for`).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import requests
import trustme

VENV_BIN = Path(sys.executable).parent
AXME_FW = str(VENV_BIN / "axme-fw")


def wait_for[T](
    check: Callable[[], T | None],
    timeout: float = 10.0,
    what: str = "condition",
    step: float = 0.005,
) -> T:
    """Poll ``check`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
        except Exception as exc:  # the condition may fail while the system settles
            last_exc = exc
            value = None
        if value:
            return value
        time.sleep(step)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what} (last error: {last_exc!r})"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# ---------------------------------------------------------------- upstream


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    t: float


@dataclass
class Upstream:
    """A threaded HTTP(S) server that records what reaches it."""

    port: int
    scheme: str
    server: HTTPServer
    seen: list[Seen] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def paths(self, prefix: str = "") -> list[str]:
        return [s.path for s in list(self.seen) if s.path.startswith(prefix)]


def _make_handler(up: list[Upstream], protocol: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = protocol

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _record(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            up[0].seen.append(
                Seen(
                    self.command,
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                    time.time(),
                )
            )

        def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            self._record()
            if self.path.startswith("/slow"):
                up[0].release.wait(30)
                self._send(200, b'{"slow": "done"}')
            elif self.path.startswith("/sse"):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()
                try:
                    for i in range(400):  # 20 s at most
                        self.wfile.write(f"data: {i}\n\n".encode())
                        self.wfile.flush()
                        time.sleep(0.05)
                except OSError:
                    pass
                self.close_connection = True
            else:
                headers = {k.lower(): v for k, v in self.headers.items()}
                self._send(200, json.dumps({"path": self.path, "headers": headers}).encode())

        do_POST = do_GET
        do_PUT = do_GET
        do_DELETE = do_GET

    return Handler


class _ThreadedServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024


class _OrderedServer(HTTPServer):
    request_queue_size = 1024


def start_upstream(tls: ssl.SSLContext | None = None, *, ordered: bool = False) -> Upstream:
    """An upstream on a free port. ``ordered``: one connection at a time, closed after each
    response, so ``seen`` is exactly the order in which connections reached it."""
    holder: list[Upstream] = []
    cls = _OrderedServer if ordered else _ThreadedServer
    server = cls(("127.0.0.1", 0), _make_handler(holder, "HTTP/1.0" if ordered else "HTTP/1.1"))
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    up = Upstream(server.server_address[1], "https" if tls else "http", server)
    holder.append(up)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return up


def upstream_ca(tmp: Path) -> tuple[trustme.CA, ssl.SSLContext, Path]:
    """A test CA, a server context for 127.0.0.1/localhost, and the CA's PEM path."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(ctx)
    pem = tmp / "upstream-ca.pem"
    ca.cert_pem.write_to_path(str(pem))
    return ca, ctx, pem


# ---------------------------------------------------------------- the proxy


@dataclass
class Proxy:
    port: int
    rules: Path
    state: Path
    proc: subprocess.Popen[bytes]
    log: Path
    admin_port: int = 0

    @property
    def ca(self) -> Path:
        return self.state / "mitmproxy-ca-cert.pem"

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts the proxy's CA (what SSL_CERT_FILE gives a process)."""
        return ssl.create_default_context(cafile=str(self.ca))

    def session(self, agent: str | None, token: str | None) -> requests.Session:
        """A requests session through this proxy as ``agent`` (HTTP and HTTPS)."""
        s = requests.Session()
        s.trust_env = False
        s.proxies = {"http": self.url(agent, token), "https": self.url(agent, token)}
        s.verify = str(self.ca)
        return s

    def url(self, agent: str | None, token: str | None) -> str:
        if agent is None:
            return f"http://127.0.0.1:{self.port}"
        return f"http://{agent}:{token}@127.0.0.1:{self.port}"

    def env(self, agent: str | None, token: str | None) -> dict[str, str]:
        """A client environment configured only through proxy variables."""
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        url = self.url(agent, token)
        env.update(
            HTTP_PROXY=url,
            HTTPS_PROXY=url,
            http_proxy=url,
            https_proxy=url,
            NO_PROXY="",
            no_proxy="",
            SSL_CERT_FILE=str(self.ca),
            REQUESTS_CA_BUNDLE=str(self.ca),
            CURL_CA_BUNDLE=str(self.ca),
        )
        return env

    def cli(
        self, *args: str, check: bool = True, timeout: float = 20
    ) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, AXME_FW_RULES=str(self.rules), AXME_FW_STATE=str(self.state))
        res = subprocess.run(
            [AXME_FW, *args], capture_output=True, text=True, env=env, timeout=timeout
        )
        if check and res.returncode != 0:
            raise AssertionError(f"axme-fw {' '.join(args)} exited {res.returncode}: {res.stderr}")
        return res

    def audit(self) -> list[dict[str, Any]]:
        path = self.state / "audit.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def audit_events(self, event: str) -> list[dict[str, Any]]:
        return [r for r in self.audit() if r.get("event") == event]

    def edit_rules(self, name: str, text: str) -> None:
        """Save ``NAME.yaml`` like an editor (rename) and wait until the proxy reloaded."""
        before = len(self.audit_events("rules.reloaded"))
        replace_file(self.rules / f"{name}.yaml", text)
        wait_for(lambda: len(self.audit_events("rules.reloaded")) > before, 10, "the reload")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def server_cli(
    admin_port: int, token: str, *args: str, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """`axme-fw --server http://127.0.0.1:ADMIN_PORT ...` as an operator's laptop runs it:
    the token in AXME_FW_ADMIN_TOKEN, no other AXME_FW_* setting."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AXME_FW_")}
    env["AXME_FW_ADMIN_TOKEN"] = token
    cmd = [AXME_FW, "--server", f"http://127.0.0.1:{admin_port}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def start_proxy(
    rules: Path, state: Path, upstream_ca_pem: Path | None = None, *extra: str
) -> Proxy:
    port = free_port()
    admin_port = free_port()
    state.mkdir(parents=True, exist_ok=True)
    log = state.parent / f"proxy-{port}.log"
    args = [
        AXME_FW,
        "run",
        "--rules",
        str(rules),
        "--state",
        str(state),
        "--listen-port",
        str(port),
        "--admin-listen",
        f"127.0.0.1:{admin_port}",
    ]
    if upstream_ca_pem is not None:
        args += ["--set", f"ssl_verify_upstream_trusted_ca={upstream_ca_pem}"]
    args += list(extra)
    with open(log, "wb") as fh:
        proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    proxy = Proxy(port, rules, state, proc, log, admin_port)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"proxy exited {proc.returncode}:\n{log.read_text()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return False
        return (state / "enforced.json").exists() and proxy.ca.exists()

    try:
        wait_for(ready, 20, "the proxy to listen")
    except BaseException:
        proxy.stop()
        raise
    return proxy


def agents_yaml(entries: dict[str, tuple[str, list[str]]], **more: str) -> str:
    """``{name: (token, allow)}`` → an ``agents:`` section; ``more[name]`` adds indented YAML."""
    lines = ["agents:"]
    for name, (token, allow) in entries.items():
        lines += [
            f"  {name}:",
            f"    token_sha256: {token_hash(token)}",
            f"    allow: [{', '.join(allow)}]",
        ]
        if name in more:
            lines += ["    " + line for line in more[name].strip("\n").splitlines()]
    return "\n".join(lines) + "\n"


def make_rules(directory: Path, **files: str) -> Path:
    """Create a rules directory with ``NAME.yaml`` for each ``NAME=text``; returns it."""
    directory.mkdir(parents=True)
    for name, text in files.items():
        (directory / f"{name}.yaml").write_text(text)
    return directory


def replace_file(path: Path, text: str) -> None:
    """Write like an editor that saves by rename."""
    tmp = path.with_name(f".{path.name}.swp")
    tmp.write_text(text)
    os.replace(tmp, path)


def iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    if not path.exists():
        return
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                yield json.loads(line)
            except ValueError:
                continue


def saw_status(path: Path, status: int) -> bool:
    """Whether a worker's JSONL output has a request with ``status``."""
    return any(r.get("status") == status for r in iter_jsonl(path))


def first_after(path: Path, t: float) -> dict[str, Any] | None:
    """A worker's first request that started after wall-clock time ``t``."""
    return next((r for r in iter_jsonl(path) if r["t0"] > t), None)
