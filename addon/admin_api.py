"""mitmproxy face: the admin API's routes (tornado handlers), JSON in and out.

=========================  ========  ======================================================
route                      role      what
=========================  ========  ======================================================
``GET /healthz``           none      the process and its loop answer
``GET /readyz``            none      rules loaded, state and audit writable (else 503)
``GET /v1/kills``          viewer    the kill list as enforced, and its revision
``POST /v1/kills``         operator  ``{"agent", "reason", "mode": "block"|"park"}``: kill
``DELETE /v1/kills/NAME``  operator  resume (``?reason=``)
``GET /v1/status``         viewer    the ``status --json`` document; on a replica, with
                                     ``fleet``: every replica and agent (Redis)
``GET /v1/audit``          viewer    records (``?since=ISO&agent=A&all=1``)
``POST /v1/audit/verify``  viewer    the hash chain check
``GET /metrics``           viewer    Prometheus text (no auth with ``--metrics-public``)
=========================  ========  ======================================================

Errors are ``{"error": reason, "detail": ...}`` with the status that fits: 400 bad
input, 401 no or wrong token, 403 role too low, 404, 405, 409 kill list unreadable, 429
too many failed attempts from this address. A kill or resume returns once the proxy
enforces it (200), or 202 when that was not confirmed within 2 s.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Mapping
from typing import Any, Protocol

import tornado.web

from .operators import Brake, authenticate, bearer
from .ruleset import Operator

_AGENT = re.compile(r"[A-Za-z0-9*?\[\]._-]{1,200}")


class Backend(Protocol):
    """What the routes need from the proxy (see :class:`axme_fw.admin_ops.Operations`)."""

    metrics_public: bool

    def operators(self) -> Mapping[str, Operator]: ...
    def audit(self, event: str, **fields: Any) -> None: ...
    def kills(self) -> dict[str, Any]: ...
    def kill(
        self, agent: str, mode: str, reason: str, by: str, address: str
    ) -> Awaitable[tuple[int, dict[str, Any]]]: ...
    def resume(
        self, agent: str, reason: str, by: str, address: str
    ) -> Awaitable[tuple[int, dict[str, Any]]]: ...
    def status(self) -> Awaitable[dict[str, Any]]: ...
    def records(
        self, agent: str | None, since: str | None, everything: bool
    ) -> Awaitable[list[Mapping[str, Any]]]: ...
    def verify(self) -> Awaitable[dict[str, Any]]: ...
    def metrics(self) -> bytes: ...


class Json(tornado.web.RequestHandler):
    """Base: JSON answers, bearer auth by role (``role`` None: no auth)."""

    role: str | None = "viewer"
    backend: Backend
    brake: Brake
    operator: Operator | None = None

    def initialize(self, backend: Backend, brake: Brake) -> None:
        self.backend, self.brake = backend, brake

    def send(self, status: int, body: Mapping[str, Any] | list[Any]) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.set_header("Cache-Control", "no-store")
        self.finish(json.dumps(body) + "\n")

    def fail(self, status: int, reason: str, detail: str) -> None:
        self.send(status, {"error": reason, "detail": detail})

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        reason = {404: "not_found", 405: "method_not_allowed"}.get(status_code, "internal_error")
        self.fail(status_code, reason, self._reason)

    def prepare(self) -> None:
        if self.role is None or (self.role == "metrics" and self.backend.metrics_public):
            return
        address = self.request.remote_ip or "-"
        now = time.monotonic()
        wait = self.brake.retry_after(address, now)
        if wait > 0:
            self.set_header("Retry-After", str(int(wait) + 1))
            self.fail(429, "too_many_failures", f"too many failed logins from {address}")
            return
        op = authenticate(
            self.backend.operators(), bearer(self.request.headers.get("Authorization"))
        )
        if op is None:
            failures = self.brake.failed(address, now)
            self.backend.audit(
                "admin.auth_failed", address=address, path=self.request.path, failures=failures
            )
            self.set_header("WWW-Authenticate", 'Bearer realm="axme-fw"')
            self.fail(401, "unauthorized", "no or unknown bearer token (axme-fw operator add)")
            return
        need = "viewer" if self.role == "metrics" else self.role
        if not op.may(need):
            self.fail(403, "forbidden", f"{op.name} is a {op.role}; this needs {need}")
            return
        self.operator = op

    @property
    def by(self) -> str:
        assert self.operator is not None
        return f"api:{self.operator.name}"

    def body(self) -> dict[str, Any] | None:
        """The JSON object sent, or None (answered 400)."""
        try:
            data = json.loads(self.request.body or b"{}")
        except ValueError:
            data = None
        if not isinstance(data, dict):
            self.fail(400, "bad_request", "send a JSON object")
            return None
        return data


class Kills(Json):
    def get(self) -> None:
        self.send(200, self.backend.kills())

    async def post(self) -> None:
        data = self.body()
        if data is None:
            return
        agent, reason = data.get("agent"), data.get("reason", "")
        mode = data.get("mode", "block")
        if not isinstance(agent, str) or not _AGENT.fullmatch(agent):
            self.fail(400, "bad_request", "agent: a name or a glob (letters, digits, ._-*?[])")
            return
        if mode not in ("block", "park") or not isinstance(reason, str) or len(reason) > 2000:
            self.fail(400, "bad_request", 'mode: "block" or "park"; reason: a string')
            return
        address = self.request.remote_ip or "-"
        status, out = await self.backend.kill(agent, mode, reason, self.by, address)
        self.send(status, out)

    def prepare(self) -> None:
        self.role = "operator" if self.request.method != "GET" else "viewer"
        super().prepare()


class Kill(Json):
    role = "operator"

    async def delete(self, agent: str) -> None:
        reason = self.get_query_argument("reason", "")
        address = self.request.remote_ip or "-"
        status, out = await self.backend.resume(agent, reason, self.by, address)
        self.send(status, out)


class Status(Json):
    async def get(self) -> None:
        self.send(200, await self.backend.status())


class Audit(Json):
    async def get(self) -> None:
        agent = self.get_query_argument("agent", None)
        since = self.get_query_argument("since", None)
        everything = self.get_query_argument("all", "") in ("1", "true")
        try:
            records = await self.backend.records(agent, since, everything)
        except ValueError as exc:
            self.fail(400, "bad_request", f"since: {exc}")
            return
        self.send(200, {"records": list(records)})


class Verify(Json):
    async def post(self) -> None:
        self.send(200, await self.backend.verify())


class Metrics(Json):
    role = "metrics"

    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(self.backend.metrics())


def routes(backend: Backend) -> list[tuple[str, type[Json], dict[str, Any]]]:
    args = {"backend": backend, "brake": Brake()}
    return [
        (r"/v1/kills", Kills, args),
        (r"/v1/kills/([^/]+)", Kill, args),
        (r"/v1/status", Status, args),
        (r"/v1/audit", Audit, args),
        (r"/v1/audit/verify", Verify, args),
        (r"/metrics", Metrics, args),
    ]
