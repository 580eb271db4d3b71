"""CLI: the admin API's client, for ``axme-fw --server URL``.

Standard library only (urllib). It never goes through a proxy from the environment: an
operator's shell may carry an agent's ``HTTPS_PROXY``, and the firewall refuses agents'
flows to its own admin listener.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

TIMEOUT = 10.0


class ClientError(Exception):
    """One line for the operator: what failed and, where it helps, what to do."""


@dataclass(frozen=True)
class Client:
    url: str
    token: str | None
    cacert: str | None = None

    def call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        query: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        """(status, decoded JSON). Raises :class:`ClientError` for transport and auth
        failures (401, 403, 429) and for answers that are not JSON."""
        import ssl  # here, not at import: every CLI command imports this module
        import urllib.error
        import urllib.parse
        import urllib.request

        target = self.url.rstrip("/") + path
        if query:
            target += "?" + urllib.parse.urlencode(query)
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(target, data=data, method=method, headers=headers)
        handlers: list[Any] = [urllib.request.ProxyHandler({})]
        if target.startswith("https:"):
            ctx = ssl.create_default_context(cafile=self.cacert)
            handlers.append(urllib.request.HTTPSHandler(context=ctx))
        opener = urllib.request.build_opener(*handlers)
        try:
            with opener.open(req, timeout=TIMEOUT) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ClientError(f"cannot reach the admin API at {self.url}: {reason}") from None
        try:
            decoded = json.loads(raw) if raw.strip().startswith((b"{", b"[")) else raw.decode()
        except ValueError:
            raise ClientError(f"{self.url}{path}: answer is not JSON (HTTP {status})") from None
        if status in (401, 403, 429):
            detail = decoded.get("detail", "") if isinstance(decoded, dict) else ""
            what = {401: "refused the token", 403: "refused this call", 429: "is slowing you down"}
            hint = " (set AXME_FW_ADMIN_TOKEN or --token-file)" if status == 401 else ""
            raise ClientError(f"the admin API {what[status]} (HTTP {status}): {detail}{hint}")
        return status, decoded
