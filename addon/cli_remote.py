"""CLI: ``kill``, ``pause``, ``resume``, ``status``, ``audit`` and ``audit verify`` through the
admin API (``axme-fw --server URL``), with the same output, ``--json`` and exit codes as
on the local directories: 0 ok, 1 failure (an auth failure too, in one line), 2 usage.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

import click

from .cli_common import fail
from .client import Client, ClientError


def client(server: str, token_file: Path | None, cacert: str | None) -> Client:
    """A client for ``server``, its token from ``--token-file`` or AXME_FW_ADMIN_TOKEN."""
    if not server.startswith(("http://", "https://")):
        fail(f"--server {server!r}: use http://HOST:PORT or https://HOST:PORT", 2)
    token = os.environ.get("AXME_FW_ADMIN_TOKEN")
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            fail(f"--token-file {token_file}: {exc.strerror or exc}", 2)
    return Client(server, token or None, cacert)


def _call(c: Client, method: str, path: str, **kw: Any) -> tuple[int, Any]:
    try:
        return c.call(method, path, **kw)
    except ClientError as exc:
        fail(str(exc))


def change(c: Client, agent: str, mode: str | None, reason: str) -> None:
    """Kill or pause (``mode``), or resume (None); wait for enforcement as locally."""
    if mode is None:
        path = f"/v1/kills/{urllib.parse.quote(agent, safe='')}"
        status, out = _call(c, "DELETE", path, query={"reason": reason} if reason else None)
    else:
        body = {"agent": agent, "mode": mode, "reason": reason}
        status, out = _call(c, "POST", "/v1/kills", body=body)
    if status not in (200, 202) or not isinstance(out, dict):
        fail(_error(status, out))
    for warning in out.get("warnings") or []:
        click.echo(f"axme-fw: warning: {warning}", err=True)
    verb = f"{out.get('action', 'changed')} {agent}"
    if status == 202:
        fail(f"{verb}: {out.get('detail')}")
    ms = float(out.get("enforced_ms", 0))
    if out.get("replicas"):
        n = len(out["replicas"])
        rev = out.get("revision")
        click.echo(f"{verb}: enforced by {n}/{n} replicas in {ms:.0f} ms (revision {rev})")
        return
    where = ", ".join(out.get("enforced_by") or []) or c.url
    click.echo(f"{verb}: enforced by the proxy on {where} {ms:.0f} ms after the write")


def status(c: Client, as_json: bool, watch: bool) -> None:
    from rich.console import Console

    def fetch() -> dict[str, Any]:
        code, data = _call(c, "GET", "/v1/status")
        if code != 200 or not isinstance(data, dict):
            fail(_error(code, data))
        return data

    if as_json:
        click.echo(json.dumps(fetch(), indent=2))
        return
    console = Console()
    if not watch:
        console.print(shown(fetch()), crop=False)
        return
    from rich.live import Live

    with Live(shown(fetch()), console=console, auto_refresh=False) as live:
        try:
            while True:
                time.sleep(1.0)
                live.update(shown(fetch()), refresh=True)
        except KeyboardInterrupt:
            pass


def shown(data: dict[str, Any]) -> Any:
    """The proxy's table; for a replica, then every replica and agent of the fleet."""
    from rich.console import Group
    from rich.text import Text

    from .status import render

    fleet = data.get("fleet")
    if fleet is None:
        return render(data)
    if "error" in fleet:
        return Group(render(data), Text(f"fleet: {fleet['detail']}", style="red"))
    from .fleet_view import lines

    # As `--redis status` prints them: one line per replica, never wrapped at 80 columns.
    fleet_lines = Text("\n".join(lines(fleet)), no_wrap=True, overflow="ignore")
    return Group(render(data), Text("fleet (Redis):", style="bold"), fleet_lines)


def records(c: Client, agent: str | None, since: str | None, everything: bool) -> list[Any]:
    query = {k: v for k, v in (("agent", agent), ("since", since)) if v is not None}
    if everything:
        query["all"] = "1"
    code, data = _call(c, "GET", "/v1/audit", query=query)
    if code != 200 or not isinstance(data, dict):
        fail(_error(code, data))
    return list(data.get("records") or [])


def verify(c: Client, as_json: bool) -> None:
    code, out = _call(c, "POST", "/v1/audit/verify")
    if code != 200 or not isinstance(out, dict):
        fail(_error(code, out))
    if as_json:
        click.echo(json.dumps(out))
        sys.exit(0 if out.get("ok") else 1)
    if not out.get("ok"):
        fail(str(out.get("problem")))
    note = f" ({out['problem']})" if out.get("problem") else ""
    click.echo(f"audit log intact: {out.get('records')} records in {out.get('file')}{note}")


def _error(status: int, out: object) -> str:
    if isinstance(out, dict) and "error" in out:
        return f"the admin API answered {status} {out['error']}: {out.get('detail', '')}"
    return f"the admin API answered {status}"
