"""CLI: ``axme-fw``: the command line. The only module that imports click.

Exit codes: 0 ok, 1 failure, 2 usage error. Errors are one line on stderr; ``--json``
output is pure JSON on stdout.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import secrets
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

import click
import yaml

from . import audit as audit_mod
from . import killswitch
from .rules import GENERATED_AGENTS_FILE, Loader, RulesError, atomic_write
from .ruleset import Ruleset, is_pattern, token_digest
from .yamlnodes import parse_duration

CONTEXT = {"help_option_names": ["-h", "--help"]}
RULES_OPT = click.option(
    "--rules",
    "rules_dir",
    type=click.Path(path_type=Path),
    envvar="AXME_FW_RULES",
    default="rules",
    show_default=True,
    help="Rules directory (or AXME_FW_RULES).",
)
STATE_OPT = click.option(
    "--state",
    "state_dir",
    type=click.Path(path_type=Path),
    envvar="AXME_FW_STATE",
    default="state",
    show_default=True,
    help="State directory (or AXME_FW_STATE).",
)


def fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"axme-fw: {message}", err=True)
    sys.exit(code)


def load_rules(rules_dir: Path) -> Ruleset:
    try:
        return Loader(rules_dir).load()
    except RulesError as exc:
        first = exc.messages[0]
        more = (
            f" (and {len(exc.messages) - 1} more; run `axme-fw rules check`)"
            if len(exc.messages) > 1
            else ""
        )
        fail(f"{first}{more}")


def need_dir(path: Path, what: str) -> Path:
    """``path`` if it is a directory, else exit 1 naming the path and how to set it."""
    if not path.is_dir():
        opt, env_var = (
            ("--rules", "AXME_FW_RULES") if what == "rules" else ("--state", "AXME_FW_STATE")
        )
        shown = f"{path} ({path.resolve()})" if not path.is_absolute() else str(path)
        fail(f"{what} directory {shown} not found; set it with {opt} or {env_var}")
    return path


def rules_for_reading(rules_dir: Path, state_dir: Path) -> tuple[Ruleset, str | None]:
    """The rules on disk; when they are broken, what the proxy enforces, plus a warning.

    On-call runs ``status`` exactly when a rules file is broken: the proxy keeps its
    last good rules then, and so does this. Exits 1 when neither can be had.
    """
    need_dir(rules_dir, "rules")
    try:
        return Loader(rules_dir).load(), None
    except RulesError as exc:
        from .snapshot import enforced_rules

        enforced = enforced_rules(state_dir) if state_dir.is_dir() else None
        more = f" (and {len(exc.messages) - 1} more)" if len(exc.messages) > 1 else ""
        if enforced is None:
            fail(f"{exc.messages[0]}{more}; and no proxy has published its rules in {state_dir}")
        warning = (
            f"warning: rules on disk are broken: {exc.messages[0]}{more}; showing the last "
            f"good rules the proxy enforces (run `axme-fw rules check`)"
        )
        return enforced, warning


def who() -> str:
    return f"cli:{os.environ.get('USER') or getpass.getuser()}"


@click.group(context_settings=CONTEXT)
def main() -> None:
    """Egress firewall and kill switch for AI agents.

    \b
    Quick start:
      axme-fw agent add deployer        # prints a token once
      axme-fw run                       # the proxy on 127.0.0.1:8080
      eval "$(axme-fw env deployer)"    # in the agent's shell
      axme-fw kill deployer --reason "runaway deploys"
    """


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
    help="HOST:PORT of the admin API (/healthz, /readyz), or off (or AXME_FW_ADMIN_LISTEN).",
)
@click.option("--admin-cert", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--admin-key", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option(
    "--admin-insecure", is_flag=True, help="Allow plain HTTP for the admin API off loopback."
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
    sets: tuple[str, ...],
) -> None:
    """Start the proxy with the firewall.

    Example: axme-fw run --rules rules --state state --listen-port 8080
    """
    from .admin import AdminConfigError, check, is_loopback, parse_listen
    from .runner import serve  # imports mitmproxy: only for this command

    load_rules(rules_dir)  # a readable error before mitmproxy starts
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
        *sets,
    )
    click.echo(
        f"axme-fw: proxy on {listen_host}:{listen_port}, rules {rules_dir}, state {state_dir}"
    )
    if admin is not None and admin_cert is None and not is_loopback(admin.host):
        click.echo(
            f"axme-fw: warning: the admin API on {admin_listen} is plain HTTP (--admin-insecure)",
            err=True,
        )
    click.echo(f"axme-fw: clients must trust {state_dir.resolve() / 'mitmproxy-ca-cert.pem'}")
    sys.stdout.flush()
    sys.exit(serve(rules_dir, state_dir, listen_host, listen_port, sets))


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
        if not is_pattern(agent) and not _defined(rules_dir, agent):
            click.echo(f"axme-fw: warning: no agent {agent!r} in the rules", err=True)


def _defined(rules_dir: Path, agent: str) -> bool:
    """Whether ``agent`` is in the rules (True when they cannot be read: no false alarm)."""
    try:
        return agent in Loader(rules_dir).load().agents
    except RulesError:
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


NOISY = frozenset(
    {"decision", "llm.usage", "kill.written", "limit.throttled"}
)  # per request: --all shows them


def parse_since(value: str | None) -> str | None:
    """``--since 1h`` / ``30m`` / ``2026-11-30T06:00:00Z`` → an ISO time to compare with."""
    if value is None:
        return None
    from datetime import UTC, datetime, timedelta

    seconds = parse_duration(value)
    if seconds is not None:
        then = datetime.now(UTC) - timedelta(seconds=seconds)
    else:
        try:
            then = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            fail(f"--since {value!r}: use a duration (30m, 1h, 2d) or an ISO time", 2)
        if then.tzinfo is None:
            then = then.replace(tzinfo=UTC)
    return then.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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


@main.group(context_settings=CONTEXT, invoke_without_command=True)
@click.option("--agent", help="Only records about this agent.")
@click.option("--since", help="Only records since a duration ago (1h, 30m) or an ISO time.")
@click.option("--all", "show_all", is_flag=True, help="Include per-request records.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line (all records).")
@STATE_OPT
@click.pass_context
def audit(
    ctx: click.Context,
    agent: str | None,
    since: str | None,
    show_all: bool,
    as_json: bool,
    state_dir: Path,
) -> None:
    """A timeline of kills, resumes, auto-kills, rule changes and alerts.

    `audit verify` checks the log's hash chain.

    Example: axme-fw audit --since 1h --agent deployer
    """
    if ctx.invoked_subcommand is not None:
        return
    need_dir(state_dir, "state")
    start = parse_since(since)
    for rec in audit_mod.read(state_dir / audit_mod.AUDIT_FILE):
        if agent is not None and rec.get("agent") != agent:
            continue
        if start is not None and str(rec.get("ts", "")) < start:
            continue
        if as_json:
            click.echo(json.dumps(rec))
        elif show_all or rec.get("event") not in NOISY:
            click.echo(timeline_line(rec))


@audit.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--state",
    "state_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="State directory (default: `audit --state`, AXME_FW_STATE, ./state).",
)
@click.pass_context
def verify(ctx: click.Context, as_json: bool, state_dir: Path | None) -> None:
    """Check the hash chain; exit 1 naming the first bad line.

    `axme-fw audit --state X verify` and `axme-fw audit verify --state X` are the same.

    Example: axme-fw audit verify --state state
    """
    group = ctx.parent
    assert group is not None
    for name, flag in (("agent", "--agent"), ("since", "--since"), ("show_all", "--all")):
        if group.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE:
            fail(f"{flag} does not apply to `audit verify` (it checks the whole log)", 2)
    as_json = as_json or bool(group.params["as_json"])
    state = need_dir(state_dir if state_dir is not None else group.params["state_dir"], "state")
    path = state / audit_mod.AUDIT_FILE
    result = audit_mod.verify(path)
    if as_json:
        out = {
            "ok": result.ok,
            "records": result.lines,
            "problem": result.problem,
            "file": str(path),
        }
        click.echo(json.dumps(out))
        sys.exit(0 if result.ok else 1)
    if not result.ok:
        fail(result.problem)
    note = f" ({result.problem})" if result.problem else ""
    click.echo(f"audit log intact: {result.lines} records in {path}{note}")


# ---------------------------------------------------------------- rules, agents, env


@main.group(context_settings=CONTEXT)
def rules() -> None:
    """Work with the rules directory."""


@rules.command(context_settings=CONTEXT)
@click.argument("directory", required=False, type=click.Path(path_type=Path))
@RULES_OPT
def check(directory: Path | None, rules_dir: Path) -> None:
    """Validate every rules file; print every problem as FILE:LINE: key: problem.

    Example: axme-fw rules check rules/
    """
    target = need_dir(directory or rules_dir, "rules")
    try:
        rs = Loader(target).load()
    except RulesError as exc:
        for message in exc.messages:
            click.echo(message, err=True)
        sys.exit(1)
    click.echo(
        f"{target}: ok ({len(rs.agents)} agents, {len(rs.actions)} actions, {len(rs.kills)} kills)"
    )


@main.group(context_settings=CONTEXT)
def agent() -> None:
    """Manage agents."""


@agent.command(context_settings=CONTEXT)
@click.argument("name")
@click.option("--allow", multiple=True, help="Action names the agent may use (repeatable).")
@click.option("--print-only", is_flag=True, help="Print the YAML to paste instead of writing it.")
@RULES_OPT
def add(name: str, allow: tuple[str, ...], print_only: bool, rules_dir: Path) -> None:
    """Create agent NAME: print its token once, record only its hash.

    The entry goes to rules/agents.generated.yaml (machine-written, never a
    hand-edited file), or to stdout with --print-only.

    Example: axme-fw agent add deployer --allow llm --allow deploy
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        fail(f"agent name {name!r}: use letters, digits, '.', '_' and '-'", 2)
    current = load_rules(rules_dir) if rules_dir.is_dir() else None
    if current is not None and name in current.agents:
        fail(f"agent {name!r} already exists ({current.agents[name].where})")
    for a in allow:
        if current is None or (a != "*" and a not in current.actions):
            fail(f"--allow {a}: no such action in {rules_dir}", 2)
    token = secrets.token_urlsafe(32)
    entry = {"token_sha256": token_digest(token), "allow": list(allow)}
    if print_only:
        click.echo(yaml.safe_dump({"agents": {name: entry}}, sort_keys=False), nl=False)
    else:
        from filelock import FileLock

        path = rules_dir / GENERATED_AGENTS_FILE
        rules_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(rules_dir / f".{GENERATED_AGENTS_FILE}.lock")):
            data = yaml.safe_load(path.read_text()) if path.exists() else None
            agents = (data or {}).get("agents") or {}
            agents[name] = entry
            header = (
                "# Written by `axme-fw agent add`; move entries to your own files to edit them.\n"
            )
            atomic_write(path, header + yaml.safe_dump({"agents": agents}, sort_keys=False))
        click.echo(f"added agent {name} to {path}", err=True)
    click.echo(f"token (shown once, store it as a secret): {token}", err=True)
    if not print_only:
        click.echo(token)


LOOPBACK = ("localhost", "127.0.0.1", "::1")


def host_part(target: str) -> str:
    """The host of a rules ``host``, ``host:port`` or ``[v6]:port`` (a glob or not)."""
    if target.startswith("["):
        return target[1:].partition("]")[0]
    return target.rsplit(":", 1)[0] if target.count(":") == 1 else target


def routed_loopback(rules: Ruleset, agent: str) -> str | None:
    """What in the rules sends a loopback host through the proxy (None: nothing does).

    NO_PROXY must never cover such a host: the client would connect directly, and
    the firewall would neither see nor stop it. The loopback spellings are one host
    for this purpose (``localhost`` resolves to ``127.0.0.1``).
    """
    import fnmatch

    a = rules.agents.get(agent)
    if a is not None and "*" in a.allow:
        return f"agents.{agent}.allow: '*' (every destination)"
    for name, action in rules.actions.items():
        for pattern in action.hosts:
            if any(fnmatch.fnmatchcase(lb, host_part(pattern)) for lb in LOOPBACK):
                return f"actions.{name}.hosts: {pattern}"
    for other in rules.agents.values():
        for address in other.addresses:
            if host_part(address).lower() in LOOPBACK:
                return f"agents.{other.name}.addresses: {address}"
    return None


def proxy_address(state_dir: Path) -> tuple[str, str | None]:
    """``host:port`` of the proxy that last ran with ``state_dir`` (a wildcard bind as
    loopback), and a note when it had to be assumed."""
    ack = killswitch.read_enforced(state_dir)
    listen = ack.get("listen") if ack is not None else None
    if not listen:
        return "127.0.0.1:8080", f"no proxy has run with {state_dir}: assuming 127.0.0.1:8080"
    host, _, port = str(listen[0]).rpartition(":")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return (f"[{host}]:{port}" if ":" in host else f"{host}:{port}"), None


@main.command(context_settings=CONTEXT)
@click.argument("agent_name", metavar="AGENT")
@click.option(
    "--token",
    envvar="AXME_FW_TOKEN",
    default="$AXME_FW_TOKEN",
    show_default=True,
    help="The agent's token (or AXME_FW_TOKEN); by default a reference to that variable.",
)
@click.option(
    "--proxy",
    default=None,
    help="host:port of the proxy [default: where the proxy using --state listens].",
)
@RULES_OPT
@STATE_OPT
def env(agent_name: str, token: str, proxy: str | None, rules_dir: Path, state_dir: Path) -> None:
    """Print the export lines that point an agent's process at the proxy.

    NO_PROXY covers loopback only when no rule routes loopback through the proxy;
    otherwise it is empty, and a comment says which rule. Agents trust the firewall's
    CA (in the state directory); the firewall checks upstream certificates itself.

    Example: eval "$(AXME_FW_TOKEN=... axme-fw env deployer)"
    """
    need_dir(state_dir, "state")
    rules, warning = rules_for_reading(rules_dir, state_dir)
    if warning is not None:
        click.echo(f"axme-fw: {warning}", err=True)
    if agent_name not in rules.agents:
        fail(
            f"no agent {agent_name!r} in {rules_dir} (add it with `axme-fw agent add {agent_name}`)"
        )
    note = None
    if proxy is None:
        proxy, note = proxy_address(state_dir)
    ca = state_dir.resolve() / "mitmproxy-ca-cert.pem"
    url = f"http://{agent_name}:{token}@{proxy}"
    routed = routed_loopback(rules, agent_name)
    no_proxy = "" if routed is not None else ",".join(LOOPBACK)
    if note is not None:
        click.echo(f"# {note}")
    if routed is not None:
        click.echo(f"# NO_PROXY is empty: the rules send loopback through the proxy ({routed})")
    lines = {
        "HTTP_PROXY": url,
        "HTTPS_PROXY": url,
        "http_proxy": url,
        "https_proxy": url,
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
        "SSL_CERT_FILE": str(ca),
        "CURL_CA_BUNDLE": str(ca),
        "REQUESTS_CA_BUNDLE": str(ca),
        "NODE_EXTRA_CA_CERTS": str(ca),
        "NODE_USE_ENV_PROXY": "1",
    }
    for key, value in lines.items():
        quote = '"' if value.startswith("http") and "$" in value else "'"
        click.echo(f"export {key}={quote}{value}{quote}")


@main.command(context_settings=CONTEXT)
@click.option("--agent", help="The agent this environment should be (default: the proxy user).")
@click.option("--canary", multiple=True, metavar="HOST:PORT", help="A host it must not reach.")
@click.option("--rules", "rules_dir", type=click.Path(path_type=Path), envvar="AXME_FW_RULES")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def doctor(
    agent: str | None, canary: tuple[str, ...], rules_dir: Path | None, as_json: bool
) -> None:
    """Check, from inside an agent's environment, that it is really behind the firewall.

    Example: axme-fw doctor --agent deployer --canary api.openai.com:443
    """
    from . import doctor as doc

    try:
        canaries = [doc.parse_hostport(c) for c in canary]
    except ValueError as exc:
        fail(f"--canary {exc}", 2)
    hosts = None
    if rules_dir is not None and rules_dir.is_dir():
        hosts = doc.rule_hosts(load_rules(rules_dir), agent)
    checks = doc.run(os.environ, agent, canaries, hosts)
    click.echo(doc.as_json(checks, agent) if as_json else doc.render(checks))
    sys.exit(1 if doc.failed(checks) else 0)
