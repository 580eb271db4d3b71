"""CLI: setting agents up: ``rules check``, ``agent add``, ``env`` and ``doctor``."""

from __future__ import annotations

import os
import re
import secrets
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from .cli_common import CONTEXT, RULES_OPT, STATE_OPT, fail, load_rules, need_dir, rules_for_reading
from .lazy import lazy

if TYPE_CHECKING:
    import yaml

    from . import killswitch
    from . import rules as rules_mod
    from . import ruleset as ruleset_mod
    from .ruleset import Ruleset
else:
    yaml = lazy("yaml")
    killswitch = lazy("axme_fw.killswitch")
    rules_mod = lazy("axme_fw.rules")
    ruleset_mod = lazy("axme_fw.ruleset")


@click.group(context_settings=CONTEXT)
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
        rs = rules_mod.Loader(target).load()
    except rules_mod.RulesError as exc:
        for message in exc.messages:
            click.echo(message, err=True)
        sys.exit(1)
    click.echo(
        f"{target}: ok ({len(rs.agents)} agents, {len(rs.actions)} actions, {len(rs.kills)} kills)"
    )


@click.group(context_settings=CONTEXT)
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
    entry = {"token_sha256": ruleset_mod.token_digest(token), "allow": list(allow)}
    if print_only:
        click.echo(yaml.safe_dump({"agents": {name: entry}}, sort_keys=False), nl=False)
    else:
        path = _generated(rules_dir, rules_mod.GENERATED_AGENTS_FILE, "agents", name, entry)
        click.echo(f"added agent {name} to {path}", err=True)
    click.echo(f"token (shown once, store it as a secret): {token}", err=True)
    if not print_only:
        click.echo(token)


def _generated(rules_dir: Path, file: str, section: str, name: str, entry: object | None) -> Path:
    """Add (or replace) ``section.name: entry`` in the machine-written ``file`` under its
    lock; ``entry`` None removes it."""
    from filelock import FileLock

    path = rules_dir / file
    rules_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(rules_dir / f".{file}.lock")):
        data = yaml.safe_load(path.read_text()) if path.exists() else None
        entries = (data or {}).get(section) or {}
        if entry is None:
            entries.pop(name, None)
        else:
            entries[name] = entry
        command = "agent add" if section == "agents" else "operator add"
        header = f"# Written by `axme-fw {command}`; move entries to your own files to edit them.\n"
        rules_mod.atomic_write(path, header + yaml.safe_dump({section: entries}, sort_keys=False))
    return path


@click.group(context_settings=CONTEXT)
def operator() -> None:
    """Manage the people and tools that may call the admin API."""


@operator.command("add", context_settings=CONTEXT)
@click.argument("name")
@click.option(
    "--role",
    type=click.Choice(["viewer", "operator"]),
    required=True,
    help="viewer: status, audit, metrics; operator: also kill, pause, resume.",
)
@click.option("--rotate", is_flag=True, help="Replace NAME's token (the old one stops working).")
@RULES_OPT
def operator_add(name: str, role: str, rotate: bool, rules_dir: Path) -> None:
    """Create operator NAME: print its token once (stdout: the token alone); only its
    SHA-256 is kept, in rules/operators.generated.yaml (hot-reloaded).

    Example: AXME_FW_ADMIN_TOKEN=$(axme-fw operator add alice --role operator)
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        fail(f"operator name {name!r}: use letters, digits, '.', '_' and '-'", 2)
    need_dir(rules_dir, "rules")
    current = load_rules(rules_dir)
    known = current.operators.get(name)
    generated = str(rules_dir / rules_mod.GENERATED_OPERATORS_FILE)
    if known is not None and not rotate:
        fail(f"operator {name!r} already exists ({known.where}); --rotate replaces its token")
    if known is not None and not known.where.startswith(generated):
        fail(f"operator {name!r} is hand-written at {known.where}: change its token there")
    token = secrets.token_urlsafe(32)
    entry = {"role": role, "token_sha256": ruleset_mod.token_digest(token)}
    path = _generated(rules_dir, rules_mod.GENERATED_OPERATORS_FILE, "operators", name, entry)
    click.echo(f"added operator {name} ({role}) to {path}; the token is shown once", err=True)
    click.echo(token)


@operator.command("remove", context_settings=CONTEXT)
@click.argument("name")
@RULES_OPT
def operator_remove(name: str, rules_dir: Path) -> None:
    """Remove operator NAME from rules/operators.generated.yaml: its token stops working
    as soon as the proxy reloads the rules.

    Example: axme-fw operator remove alice
    """
    need_dir(rules_dir, "rules")
    known = load_rules(rules_dir).operators.get(name)
    if known is None:
        fail(f"no operator {name!r} in {rules_dir}")
    if not known.where.startswith(str(rules_dir / rules_mod.GENERATED_OPERATORS_FILE)):
        fail(f"operator {name!r} is hand-written at {known.where}: remove it there")
    path = _generated(rules_dir, rules_mod.GENERATED_OPERATORS_FILE, "operators", name, None)
    click.echo(f"removed operator {name} from {path}")


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


@click.command(context_settings=CONTEXT)
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


@click.command(context_settings=CONTEXT)
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
    from . import doctor_probe

    try:
        canaries = [doctor_probe.parse_hostport(c) for c in canary]
    except ValueError as exc:
        fail(f"--canary {exc}", 2)
    hosts = None
    if rules_dir is not None and rules_dir.is_dir():
        hosts = doc.rule_hosts(load_rules(rules_dir), agent)
    checks = doctor_probe.run(os.environ, agent, canaries, hosts)
    click.echo(doc.as_json(checks, agent) if as_json else doc.render(checks))
    sys.exit(1 if doc.failed(checks) else 0)
