"""mitmproxy face: the admin listener, on the proxy's own event loop (tornado).

Serves, without auth, the two endpoints every platform probes:

- ``GET /healthz``: the process is alive and its loop answers (200).
- ``GET /readyz``: rules loaded, state directory writable, audit log writable (200),
  else 503 naming the failing check. The write probes run off the loop.

and the operators' API (bearer tokens, roles) of :mod:`axme_fw.admin_api`.

Listening off loopback without TLS needs ``--admin-insecure`` (and logs a warning).
Agents can never reach the listener through the proxy: the gate refuses any flow to
one of :func:`admin_targets` as ``control_forbidden``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:8081"


class AdminConfigError(ValueError):
    """A bad --admin-* setting; the message says which and what to do."""


@dataclass(frozen=True, slots=True)
class Listen:
    host: str
    port: int


OPTIONS = frozenset(
    {"axme_admin_listen", "axme_admin_cert", "axme_admin_key", "axme_admin_insecure"}
)


def add_options(loader: Any) -> None:
    loader.add_option("axme_admin_listen", str, DEFAULT_LISTEN, "axme-fw: admin HOST:PORT, or off")
    loader.add_option("axme_admin_cert", str, "", "axme-fw: admin TLS certificate (PEM)")
    loader.add_option("axme_admin_key", str, "", "axme-fw: admin TLS key (PEM)")
    loader.add_option("axme_admin_insecure", bool, False, "axme-fw: plain HTTP admin off loopback")
    loader.add_option("axme_metrics_public", bool, False, "axme-fw: serve /metrics without a token")


def listen_of(o: Any) -> Listen | None:
    """The listen address the options give; mitmproxy's OptionsError (exit 1, no
    traceback) for settings that must not start."""
    from mitmproxy import exceptions

    try:
        listen = parse_listen(o.axme_admin_listen)
        check(listen, o.axme_admin_cert, o.axme_admin_key, o.axme_admin_insecure)
    except AdminConfigError as exc:
        raise exceptions.OptionsError(f"axme-fw: {exc}") from None
    return listen


def parse_listen(value: str) -> Listen | None:
    """``HOST:PORT`` (``[v6]:PORT`` too) → :class:`Listen`; ``off`` → None."""
    if value.strip().lower() == "off":
        return None
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise AdminConfigError(f"--admin-listen {value!r}: use HOST:PORT (or off)")
    return Listen(host, int(port))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check(listen: Listen | None, cert: str, key: str, insecure: bool) -> None:
    """Raise :class:`AdminConfigError` for settings that must not start."""
    if bool(cert) != bool(key):
        raise AdminConfigError("--admin-cert and --admin-key go together")
    if listen is not None and not cert and not is_loopback(listen.host) and not insecure:
        raise AdminConfigError(
            f"--admin-listen {listen.host}:{listen.port} is not loopback: give "
            "--admin-cert/--admin-key, or --admin-insecure to serve plain HTTP anyway"
        )


def admin_targets(listen: Listen, bound_port: int) -> frozenset[tuple[str, int]]:
    """Every (host, port) a flow could name to reach the listener from this machine.

    A wildcard bind is reachable at every local address: loopback spellings, the host
    name and what it resolves to.
    """
    hosts = {listen.host.lower()}
    if listen.host in ("0.0.0.0", "::", "") or is_loopback(listen.host):
        hosts |= {"127.0.0.1", "localhost", "::1", "0.0.0.0", "::"}
    if listen.host in ("0.0.0.0", "::", ""):
        name = socket.gethostname().lower()
        hosts.add(name)
        with contextlib.suppress(OSError):
            hosts |= {str(a[4][0]).lower() for a in socket.getaddrinfo(name, None)}
    return frozenset((h, bound_port) for h in hosts)


Check = Callable[[], tuple[bool, str]]


def _probe_dir(state_dir: Path) -> tuple[bool, str]:
    probe = state_dir / f".ready-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return False, f"state directory {state_dir} not writable: {exc.strerror or exc}"
    return True, ""


def _probe_audit(path: Path, failing: Callable[[], bool]) -> tuple[bool, str]:
    if failing():
        return False, f"audit log {path}: the last append failed"
    try:
        with open(path, "ab"):
            pass
    except OSError as exc:
        return False, f"audit log {path} not writable: {exc.strerror or exc}"
    return True, ""


class AdminServer:
    """The listener; ``rules_loaded`` and ``audit_failing`` are read at each probe."""

    def __init__(
        self,
        listen: Listen,
        state_dir: Path,
        audit_path: Path,
        rules_loaded: Callable[[], bool],
        audit_failing: Callable[[], bool],
        cert: str = "",
        key: str = "",
        backend: Any = None,
    ) -> None:
        self.backend = backend  # admin_api.Backend: the /v1 routes and /metrics
        self.listen = listen
        self.state_dir = state_dir
        self.audit_path = audit_path
        self.rules_loaded = rules_loaded
        self.audit_failing = audit_failing
        self.cert, self.key = cert, key
        self.port = listen.port
        self._server: object | None = None

    def start(self) -> None:
        """Bind now (raises OSError when the address is taken)."""
        import tornado.httpserver
        import tornado.netutil
        import tornado.web

        owner = self

        class Healthz(tornado.web.RequestHandler):
            def get(self) -> None:
                self.set_header("Content-Type", "application/json")
                self.finish(json.dumps({"status": "ok", "pid": os.getpid()}) + "\n")

        class Readyz(tornado.web.RequestHandler):
            async def get(self) -> None:
                failing = await owner.failing_check()
                self.set_header("Content-Type", "application/json")
                if failing is None:
                    self.finish(json.dumps({"status": "ready"}) + "\n")
                else:
                    name, detail = failing
                    self.set_status(503)
                    self.finish(json.dumps({"error": f"not_ready:{name}", "detail": detail}) + "\n")

        class NotFound(tornado.web.RequestHandler):
            def prepare(self) -> None:
                self.set_status(404)
                self.set_header("Content-Type", "application/json")
                body = {"error": "not_found", "detail": f"no endpoint {self.request.path}"}
                self.finish(json.dumps(body) + "\n")

        handlers: list[Any] = [(r"/healthz", Healthz), (r"/readyz", Readyz)]
        if self.backend is not None:
            from .admin_api import routes

            handlers += routes(self.backend)
        app = tornado.web.Application(handlers, default_handler_class=NotFound)
        ssl_ctx = None
        if self.cert:
            ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_ctx.load_cert_chain(self.cert, self.key)
        server = tornado.httpserver.HTTPServer(app, ssl_options=ssl_ctx, xheaders=False)
        sockets = tornado.netutil.bind_sockets(self.listen.port, self.listen.host)
        server.add_sockets(sockets)
        self.port = int(sockets[0].getsockname()[1])
        self._server = server

    async def failing_check(self) -> tuple[str, str] | None:
        if not self.rules_loaded():
            return "rules", "no rules loaded"
        loop = asyncio.get_running_loop()
        ok, detail = await loop.run_in_executor(None, _probe_dir, self.state_dir)
        if not ok:
            return "state", detail
        ok, detail = await loop.run_in_executor(
            None, _probe_audit, self.audit_path, self.audit_failing
        )
        if not ok:
            return "audit", detail
        return None

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()  # type: ignore[attr-defined]
            self._server = None


def serve(
    listen: Listen,
    state_dir: Path,
    rules_loaded: Callable[[], bool],
    audit_failing: Callable[[], bool],
    cert: str = "",
    key: str = "",
    backend: Any = None,
) -> AdminServer | None:
    """Start the admin listener on the running loop; None (logged as an ERROR, which an
    operator must see at start-up) when it cannot bind."""
    from .audit import AUDIT_FILE

    server = AdminServer(
        listen, state_dir, state_dir / AUDIT_FILE, rules_loaded, audit_failing, cert, key, backend
    )
    try:
        server.start()
    except OSError as exc:
        log.error("axme-fw: cannot serve the admin API on %s:%s: %s", listen.host, listen.port, exc)
        return None
    scheme = "https" if cert else "http"
    log.info("axme-fw: admin API on %s://%s:%d", scheme, listen.host, server.port)
    if not cert and not is_loopback(listen.host):
        log.warning("axme-fw: the admin API is plain HTTP on %s (--admin-insecure)", listen.host)
    return server
