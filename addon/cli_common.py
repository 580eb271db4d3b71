"""CLI: what every command shares: options, one-line failures, reading rules."""

from __future__ import annotations

import getpass
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import click

from .client import Client
from .lazy import lazy

if TYPE_CHECKING:
    from . import rules as rules_mod
    from .ruleset import Ruleset
else:
    rules_mod = lazy("axme_fw.rules")


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
        return rules_mod.Loader(rules_dir).load()
    except rules_mod.RulesError as exc:
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
        return rules_mod.Loader(rules_dir).load(), None
    except rules_mod.RulesError as exc:
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


def remote_client() -> Client | None:
    """The admin API client when ``axme-fw --server URL`` was given, else None."""
    ctx = click.get_current_context(silent=True)
    obj = ctx.find_root().obj if ctx is not None else None
    return obj if isinstance(obj, Client) else None


def shared_redis() -> str | None:
    """The Redis URL of ``axme-fw --redis URL`` (or AXME_FW_REDIS_URL), else None."""
    ctx = click.get_current_context(silent=True)
    url = ctx.find_root().meta.get("axme_fw.redis") if ctx is not None else None
    return url if isinstance(url, str) and url else None
