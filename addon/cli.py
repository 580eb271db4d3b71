"""CLI: ``axme-fw``: the command line. With ``cli_*``, the only modules that import click.

Exit codes: 0 ok, 1 failure, 2 usage error. Errors are one line on stderr; ``--json``
output is pure JSON on stdout.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from . import cli_remote as remote
from .cli_audit import audit
from .cli_common import (
    CONTEXT,
    RULES_OPT,
    STATE_OPT,
    fail,
    load_rules,
    need_dir,
    remote_client,
    rules_for_reading,
    shared_redis,
    who,
)
from .cli_setup import agent, doctor, env, operator, rules
from .lazy import lazy

if TYPE_CHECKING:
    from . import audit as audit_mod
    from . import killswitch
    from . import rules as rules_mod
    from . import ruleset as ruleset_mod
else:
    audit_mod = lazy("axme_fw.audit")
    killswitch = lazy("axme_fw.killswitch")
    rules_mod = lazy("axme_fw.rules")
    ruleset_mod = lazy("axme_fw.ruleset")


@click.group(context_settings=CONTEXT)
@click.option(
    "--server",
    envvar="AXME_FW_SERVER",
    metavar="URL",
    help="Talk to this proxy's admin API (or AXME_FW_SERVER) instead of local directories; "
    "the token comes from AXME_FW_ADMIN_TOKEN or --token-file.",
)
@click.option("--token-file", type=click.Path(path_type=Path), help="A file holding the token.")
@click.option(
    "--cacert",
    envvar="AXME_FW_CACERT",
    type=click.Path(exists=True, dir_okay=False),
    help="CA certificate for an https:// server signed by a private CA (or AXME_FW_CACERT).",
)
@click.option(
    "--redis",
    "redis_url",
    envvar="AXME_FW_REDIS_URL",
    metavar="URL",
    help="kill/pause/resume/status on the Redis the replicas share (or AXME_FW_REDIS_URL).",
)
@click.pass_context
def main(
    ctx: click.Context,
    server: str | None,
    token_file: Path | None,
    cacert: str | None,
    redis_url: str | None,
) -> None:
    """Egress firewall and kill switch for AI agents.

    \b
    Quick start:
      axme-fw agent add deployer        # prints a token once
      axme-fw run                       # the proxy on 127.0.0.1:8080
      eval "$(axme-fw env deployer)"    # in the agent's shell
      axme-fw kill deployer --reason "runaway deploys"
      axme-fw --server https://fw.internal:8081 kill deployer   # from a laptop
    """
    ctx.obj = remote.client(server, token_file, cacert) if server else None
    if redis_url:
        _check_redis(redis_url)
    ctx.meta["axme_fw.redis"] = redis_url


def _check_redis(url: str) -> None:
    from .redis_ops import url_error

    error = url_error(url)
    if error is not None:
        fail(error, 2)


# ---------------------------------------------------------------- run


@main.command(context_settings=CONTEXT)
@RULES_OPT
@STATE_OPT
@click.option("--listen-host", default="127.0.0.1", show_default=True)
@click.option("--listen-port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--admin-listen",
    envvar="AXME_FW_ADMIN_LISTEN",
    default="127.0.0.1:8081",
    show_default=True,
    help="HOST:PORT of the admin API, or off (or AXME_FW_ADMIN_LISTEN).",
)
@click.option("--admin-cert", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--admin-key", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option(
    "--admin-insecure", is_flag=True, help="Allow plain HTTP for the admin API off loopback."
)
@click.option("--metrics-public", is_flag=True, help="Serve /metrics without a token.")
@click.option(
    "--redis",
    "redis_url",
    envvar="AXME_FW_REDIS_URL",
    metavar="URL",
    help="Share kills, limits and spend with other replicas (redis://HOST:PORT/DB, rediss://).",
)
@click.option("--replica-id", help="This replica's id [default: host name:listen port].")
@click.option(
    "--log-format",
    type=click.Choice(["console", "json"]),
    default="console",
    envvar="AXME_FW_LOG_FORMAT",
    show_default=True,
    help="json: one JSON object per line on stdout, for log collectors.",
)
@click.option(
    "--set", "sets", multiple=True, metavar="OPTION=VALUE", help="A mitmproxy option (repeatable)."
)
def run(
    rules_dir: Path,
    state_dir: Path,
    listen_host: str,
    listen_port: int,
    admin_listen: str,
    admin_cert: str | None,
    admin_key: str | None,
    admin_insecure: bool,
    metrics_public: bool,
    redis_url: str | None,
    replica_id: str | None,
    log_format: str,
    sets: tuple[str, ...],
) -> None:
    """Start the proxy with the firewall.

    Example: axme-fw run --rules rules --state state --listen-port 8080
    """
    from .admin import AdminConfigError, check, is_loopback, parse_listen
    from .runner import serve  # imports mitmproxy: only for this command

    load_rules(rules_dir)  # a readable error before mitmproxy starts
    if redis_url:
        _check_redis(redis_url)
    try:
        admin = parse_listen(admin_listen)
        check(admin, admin_cert or "", admin_key or "", admin_insecure)
    except AdminConfigError as exc:
        fail(str(exc), 2)
    state_dir.mkdir(parents=True, exist_ok=True)
    for item in sets:
        if "=" not in item:
            fail(f"--set {item!r}: expected OPTION=VALUE", 2)
    sets = (
        f"axme_admin_listen={admin_listen}",
        f"axme_admin_cert={admin_cert or ''}",
        f"axme_admin_key={admin_key or ''}",
        f"axme_admin_insecure={'true' if admin_insecure else 'false'}",
        f"axme_metrics_public={'true' if metrics_public else 'false'}",
        f"axme_redis={redis_url or ''}",
        f"axme_replica_id={replica_id or ''}",
        *sets,
    )

    def say(msg: str, level: str = "info") -> None:
        if log_format == "json":
            ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
            click.echo(json.dumps({"ts": ts, "level": level, "logger": "axme_fw.cli", "msg": msg}))
        else:
            warn = level == "warning"
            click.echo(f"axme-fw: {'warning: ' if warn else ''}{msg}", err=warn)

    say(f"proxy on {listen_host}:{listen_port}, rules {rules_dir}, state {state_dir}")
    if admin is not None and admin_cert is None and not is_loopback(admin.host):
        say(f"the admin API on {admin_listen} is plain HTTP (--admin-insecure)", "warning")
    say(f"clients must trust {state_dir.resolve() / 'mitmproxy-ca-cert.pem'}")
    sys.stdout.flush()
    sys.exit(serve(rules_dir, state_dir, listen_host, listen_port, sets, log_format))


# ---------------------------------------------------------------- kill / pause / resume


def _wait(state_dir: Path, revision: int, no_wait: bool, verb: str, written: float) -> None:
    """Wait for the proxy to acknowledge ``revision``; ``written`` is when the write began."""
    if no_wait:
        click.echo(f"{verb} written (revision {revision}); not waiting for the proxy")
        return
    ack = killswitch.wait_enforced(state_dir, revision, timeout=2.0)
    if ack is None:
        fail(
            f"{verb} written to the kill list (revision {revision}), but no running proxy "
            f"confirmed it within 2 s; it takes effect when a proxy reads {state_dir}"
        )
    ms = (time.monotonic() - written) * 1000
    where = ", ".join(ack.get("listen") or []) or f"pid {ack.get('pid')}"
    click.echo(f"{verb}: enforced by the proxy on {where} {ms:.0f} ms after the write")


def _kill(
    rules_dir: Path, state_dir: Path, agent: str, mode: str, reason: str, no_wait: bool
) -> None:
    c = remote_client()
    if c is not None:
        remote.change(c, agent, mode, reason)
        return
    if shared_redis() is not None:
        from .cli_redis import change as shared_change

        shared_change(shared_redis() or "", agent, mode, reason, who())
        return
    need_dir(rules_dir, "rules")
    need_dir(state_dir, "state")
    # Write first: checking the name needs the whole rule set parsed, which can take a
    # while on 10,000 agents, and a kill must not wait for a warning.
    written = time.monotonic()
    try:
        change = killswitch.kill(rules_dir, agent, mode, reason, who())
    except (killswitch.KillFileError, OSError) as exc:
        fail(str(exc))
    event = "agent.paused" if mode == "park" else "agent.killed"
    audit_mod.append(
        state_dir, event, agent=agent, mode=mode, reason=reason, by=who(), revision=change.revision
    )
    verb = f"{'paused' if mode == 'park' else 'killed'} {agent}"
    try:
        _wait(state_dir, change.revision, no_wait, verb, written)
    finally:
        if not ruleset_mod.is_pattern(agent) and not _defined(rules_dir, agent):
            click.echo(f"axme-fw: warning: no agent {agent!r} in the rules", err=True)


def _defined(rules_dir: Path, agent: str) -> bool:
    """Whether ``agent`` is in the rules (True when they cannot be read: no false alarm)."""
    try:
        return agent in rules_mod.Loader(rules_dir).load().agents
    except rules_mod.RulesError:
        return True


NO_WAIT = click.option("--no-wait", is_flag=True, help="Do not wait for the proxy to confirm.")


@main.command(context_settings=CONTEXT)
@click.argument("agent")
@click.option("--reason", default="", help="Why; shown to the agent and in the audit log.")
@click.option("--park", is_flag=True, help="Hold the agent's requests instead of refusing them.")
@NO_WAIT
@RULES_OPT
@STATE_OPT
def kill(
    agent: str, reason: str, park: bool, no_wait: bool, rules_dir: Path, state_dir: Path
) -> None:
    """Cut off AGENT (a name or a glob such as 'deploy-*' or '*') at the proxy.

    Example: axme-fw kill deployer --reason "runaway deploys"
    """
    _kill(rules_dir, state_dir, agent, "park" if park else "block", reason, no_wait)


@main.command(context_settings=CONTEXT)
@click.argument("agent")
@click.option("--reason", default="", help="Why; recorded in the audit log.")
@NO_WAIT
@RULES_OPT
@STATE_OPT
def pause(agent: str, reason: str, no_wait: bool, rules_dir: Path, state_dir: Path) -> None:
    """Hold AGENT's new requests until `resume` (same as `kill --park`).

    Example: axme-fw pause deployer --reason "waiting for review"
    """
    _kill(rules_dir, state_dir, agent, "park", reason, no_wait)


@main.command(context_settings=CONTEXT)
@click.argument("agent")
@click.option("--reason", default="", help="Why; recorded in the audit log.")
@NO_WAIT
@RULES_OPT
@STATE_OPT
def resume(agent: str, reason: str, no_wait: bool, rules_dir: Path, state_dir: Path) -> None:
    """Let AGENT through again; parked requests are released in order.

    Example: axme-fw resume deployer --reason "fixed the loop"
    """
    c = remote_client()
    if c is not None:
        remote.change(c, agent, None, reason)
        return
    if shared_redis() is not None:
        from .cli_redis import change as shared_change

        shared_change(shared_redis() or "", agent, None, reason, who())
        return
    need_dir(rules_dir, "rules")
    need_dir(state_dir, "state")
    written = time.monotonic()
    try:
        change = killswitch.resume(rules_dir, agent)
    except (killswitch.KillFileError, OSError) as exc:
        fail(str(exc))
    if not change.removed:
        click.echo(f"axme-fw: warning: {agent!r} was not in the kill list", err=True)
    still = killswitch.covering(change.entries, agent)
    if still:
        click.echo(
            f"axme-fw: warning: {agent} is still covered by kill {', '.join(still)}", err=True
        )
    audit_mod.append(
        state_dir, "agent.resumed", agent=agent, reason=reason, by=who(), revision=change.revision
    )
    _wait(state_dir, change.revision, no_wait, f"resumed {agent}", written)


# ---------------------------------------------------------------- status


@main.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--watch", is_flag=True, help="Refresh in place every second (Ctrl-C to stop).")
@RULES_OPT
@STATE_OPT
def status(as_json: bool, watch: bool, rules_dir: Path, state_dir: Path) -> None:
    """Agents and their instances: state, last seen, requests, spend, limits, kills.

    Works without a running proxy (reads the state directory) and says so.

    Example: axme-fw status --watch
    """
    from rich.console import Console, Group
    from rich.text import Text

    from .status import gather, render

    c = remote_client()
    if c is not None:
        remote.status(c, as_json, watch)
        return
    if shared_redis() is not None:
        from .cli_redis import status as shared_status

        shared_status(shared_redis() or "", as_json)
        return
    need_dir(state_dir, "state")
    rules, warning = rules_for_reading(rules_dir, state_dir)
    if as_json:
        data = gather(rules, state_dir)
        data["rules_warning"] = warning
        click.echo(json.dumps(data, indent=2))
        return
    if warning is not None:
        click.echo(f"axme-fw: {warning}", err=True)
    console = Console()
    if not watch:
        console.print(render(gather(rules, state_dir)))
        return
    from rich.live import Live

    def screen() -> Group:
        shown = render(gather(rules, state_dir))
        return Group(shown, Text(warning, style="yellow")) if warning else shown

    with Live(screen(), console=console, auto_refresh=False) as live:
        try:
            while True:
                time.sleep(1.0)
                rules, warning = rules_for_reading(rules_dir, state_dir)
                live.update(screen(), refresh=True)
        except KeyboardInterrupt:
            pass


# ---------------------------------------------------------------- audit


for _command in (audit, rules, agent, operator, env, doctor):
    main.add_command(_command)
