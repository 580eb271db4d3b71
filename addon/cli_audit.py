"""CLI: ``axme-fw audit``: the timeline from the audit log, and ``audit verify``."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from . import cli_remote as remote
from .cli_common import CONTEXT, fail, need_dir, remote_client
from .lazy import lazy

if TYPE_CHECKING:
    from . import audit as audit_mod
else:
    audit_mod = lazy("axme_fw.audit")


def parse_since(value: str | None) -> str | None:
    """``--since 1h`` / ``30m`` / ``2026-11-30T06:00:00Z`` → an ISO time to compare with."""
    try:
        return audit_mod.since_iso(value)
    except ValueError as exc:
        fail(f"--since {exc}", 2)


def timeline_line(rec: Mapping[str, Any]) -> str:
    """``2026-11-30 06:46:03  agent.killed       deployer  by cli:alice: runaway deploys``."""
    ts = str(rec.get("ts", "?")).replace("T", " ")[:19]
    event = str(rec.get("event", "?"))
    agent = str(rec.get("agent") or "")
    by = f"by {rec['by']}" if rec.get("by") else ""
    reason = rec.get("reason") or rec.get("detail") or ""
    skip = {"seq", "ts", "event", "prev", "agent", "by", "reason", "detail", "at"}
    extra = " ".join(
        f"{k}={v}" for k, v in rec.items() if k not in skip and v not in (None, "", [], {})
    )
    text = ": ".join(x for x in (by, str(reason)) if x)
    return "  ".join(x for x in (ts, f"{event:<20}", f"{agent:<12}", text, extra) if x).rstrip()


@click.group(context_settings=CONTEXT, invoke_without_command=True)
@click.option("--agent", help="Only records about this agent.")
@click.option("--since", help="Only records since a duration ago (1h, 30m) or an ISO time.")
@click.option("--all", "show_all", is_flag=True, help="Include per-request records.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line (all records).")
@click.option(
    "--state",
    "state_dirs",
    type=click.Path(path_type=Path),
    multiple=True,
    envvar="AXME_FW_STATE",
    default=("state",),
    show_default=True,
    help="State directory (or AXME_FW_STATE); repeat it to merge replicas' logs by time.",
)
@click.pass_context
def audit(
    ctx: click.Context,
    agent: str | None,
    since: str | None,
    show_all: bool,
    as_json: bool,
    state_dirs: tuple[Path, ...],
) -> None:
    """A timeline of kills, resumes, auto-kills, rule changes and alerts.

    Each replica keeps its own chain: give every replica's --state to see one timeline
    (records from more than one carry "state"). `audit verify` checks each chain.

    Example: axme-fw audit --since 1h --agent deployer
    """
    if ctx.invoked_subcommand is not None:
        return
    start = parse_since(since)
    found: Iterable[Mapping[str, Any]]
    c = remote_client()
    if c is not None:
        found = remote.records(c, agent, start, show_all or as_json)
    else:
        found = merged(state_dirs, agent, start)
    for rec in found:
        if as_json:
            click.echo(json.dumps(rec))
        elif show_all or rec.get("event") not in audit_mod.NOISY:
            click.echo(timeline_line(rec))


def merged(
    state_dirs: Iterable[Path], agent: str | None, start: str | None
) -> Iterator[Mapping[str, Any]]:
    """The records of every state directory's log, merged by time (each log is in order)."""
    import heapq

    dirs = [need_dir(d, "state") for d in state_dirs]
    if len(dirs) == 1:
        yield from audit_mod.select(dirs[0] / audit_mod.AUDIT_FILE, agent, start)
        return

    def tagged(d: Path) -> Iterator[Mapping[str, Any]]:
        for rec in audit_mod.select(d / audit_mod.AUDIT_FILE, agent, start):
            yield {**rec, "state": str(d)}

    yield from heapq.merge(*(tagged(d) for d in dirs), key=lambda r: str(r.get("ts", "")))


@audit.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--state",
    "state_dirs",
    type=click.Path(path_type=Path),
    multiple=True,
    help="State directory, repeatable (default: `audit --state`, AXME_FW_STATE, ./state).",
)
@click.pass_context
def verify(ctx: click.Context, as_json: bool, state_dirs: tuple[Path, ...]) -> None:
    """Check the hash chain of each state directory given; exit 1 naming the first bad line.

    `axme-fw audit --state X verify` and `axme-fw audit verify --state X` are the same.

    Example: axme-fw audit verify --state state
    """
    group = ctx.parent
    assert group is not None
    for name, flag in (("agent", "--agent"), ("since", "--since"), ("show_all", "--all")):
        if group.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE:
            fail(f"{flag} does not apply to `audit verify` (it checks the whole log)", 2)
    as_json = as_json or bool(group.params["as_json"])
    c = remote_client()
    if c is not None:
        remote.verify(c, as_json)
        return
    dirs = state_dirs or group.params["state_dirs"]
    outs = []
    for d in dirs:
        path = need_dir(d, "state") / audit_mod.AUDIT_FILE
        result = audit_mod.verify(path)
        outs.append(
            {"ok": result.ok, "records": result.lines, "problem": result.problem, "file": str(path)}
        )
    ok = all(o["ok"] for o in outs)
    if as_json:
        click.echo(json.dumps(outs[0] if len(outs) == 1 else {"ok": ok, "chains": outs}))
        sys.exit(0 if ok else 1)
    bad = [o for o in outs if not o["ok"]]
    for o in outs:
        if o["ok"]:
            note = f" ({o['problem']})" if o["problem"] else ""
            click.echo(f"audit log intact: {o['records']} records in {o['file']}{note}")
    if bad:
        fail("; ".join(str(o["problem"]) for o in bad))


# ---------------------------------------------------------------- rules, agents, env
