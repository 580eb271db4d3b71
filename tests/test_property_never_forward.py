"""The one invariant, over random rules edits and random request lines (hypothesis):
a request that the last good rules refuse is never forwarded.

The firewall's own reload path swaps or rejects each edit; the oracle keeps the last
good rules by loading every edit itself, and reads each request with a reference
reading written here (``urllib`` decoding, explicit ``.``/``..`` resolution), not
with :mod:`axme_fw.canonical`.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import os
import shutil
import time
import urllib.parse
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mitmproxy.test import taddons, tflow

from axme_fw.control import load_pricing_file
from axme_fw.firewall import Firewall
from axme_fw.policy import Facts, decide
from axme_fw.rules import RulesError, load_dir
from axme_fw.ruleset import Ruleset
from tests.rig import token_hash

BASE = """\
version: 1
actions:
  ok: {hosts: [api.example.com], paths: ["/ok/**"]}
  adm: {hosts: [api.example.com], methods: [GET], paths: ["/admin/*"]}
  other: {hosts: ["*.other.com"]}
"""
TOKENS = {"bot": "bot-token", "eve": "eve-token"}


def agent(name: str, allow: list[str]) -> str:
    digest = token_hash(TOKENS[name])
    return f"  {name}:\n    token_sha256: {digest}\n    allow: [{', '.join(allow)}]\n"


valid_agents = st.builds(
    lambda bot, eve: "agents:\n" + agent("bot", bot) + (agent("eve", eve) if eve else ""),
    st.lists(st.sampled_from(["ok", "adm", "other"]), unique=True),
    st.one_of(st.none(), st.lists(st.sampled_from(["ok", "adm", "other"]), unique=True)),
)
broken = st.sampled_from(
    [
        "",
        "  \n\n",
        "# saved half\n",
        "agents: [\n",
        "agents:\n  bot: {allow: [ok]}\n",  # no token
        "agents:\n  bot:\n    token_sha256: " + "0" * 64 + "\n    allow: [nope]\n",
        "agents:\n  bot: {token_sha256: x, allow: [ok], extra: 1}\n",
    ]
)
defaults = st.sampled_from(
    [
        "defaults: {unknown_agents: deny}\n",
        "defaults: {unknown_agents: allow}\n",
        "",  # broken: empty
        "defaults: {unknown_agents: maybe}\n",
    ]
)
edits = st.lists(
    st.one_of(
        st.tuples(st.just("agents.yaml"), st.one_of(valid_agents, broken)),
        st.tuples(st.just("defaults.yaml"), defaults),
    ),
    min_size=1,
    max_size=4,
)
SEGMENTS = ["ok", "admin", "a", "..", ".", "", "%2e%2e", "%2E", "%2f", "..;", "%252e", "x%20y"]
requests_ = st.lists(
    st.tuples(
        st.sampled_from(["bot", "bot", "eve", "mallory", None]),
        st.sampled_from([True, True, False]),  # right token
        st.sampled_from(["GET", "POST", "get"]),
        st.sampled_from(
            ["api.example.com", "API.Example.COM.", "x.other.com", "127.1", "evil.com"]
        ),
        st.builds(
            lambda first, rest: [first, *rest],
            st.sampled_from(["ok", "admin", "ok", ""]),
            st.lists(st.sampled_from(SEGMENTS), max_size=4),
        ),
        st.sampled_from(["", "?q=/../admin"]),
    ),
    min_size=1,
    max_size=6,
)


def reference(method: str, host: str, raw: str) -> tuple[str, str, str] | None:
    """(method, host, path) as an upstream reads them, or None: cannot be read one way."""
    if method != method.upper():
        return None
    h = host.lower().removesuffix(".")
    if h.replace(".", "").isdigit() and h.count(".") != 3:
        return None
    path = raw.split("?", 1)[0]
    low = path.lower()
    if any(bad in low for bad in ("%2f", "%5c", "%25", "%00")):
        return None
    out: list[str] = []
    parts = urllib.parse.unquote(path).split("/")[1:]
    for i, seg in enumerate(parts):
        if seg.startswith("..;") or seg.startswith(".;"):
            return None
        if seg == "..":
            if not out:
                return None
            out.pop()
            if i == len(parts) - 1:
                out.append("")  # RFC 3986: "/a/b/.." is "/a/", trailing slash kept
        elif seg not in (".", "") or i == len(parts) - 1:
            out.append("" if seg == "." else seg)
    return method, h, "/" + "/".join(out)


def reload_now(fw: Firewall) -> None:
    """The firewall's own reload completion, driven synchronously."""
    assert fw.loader is not None
    done: concurrent.futures.Future[object] = concurrent.futures.Future()
    try:
        done.set_result((fw.loader.load(), load_pricing_file(fw.loader.directory)))
    except RulesError as exc:
        done.set_exception(exc)
    fw.reloader.reloaded(time.monotonic(), done)  # type: ignore[arg-type]


def test_a_request_the_last_good_rules_refuse_is_never_forwarded(tmp_path: Path) -> None:
    # One mitmproxy context for every example (each opens its own event loop otherwise,
    # and mitmproxy's log handler keeps the first); each example gets a new rules dir.
    fw = Firewall()
    with taddons.context(fw) as tctx:
        examples = iter(range(10**6))

        @settings(
            max_examples=int(os.environ.get("AXME_FW_EXAMPLES", "120")),
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        @given(edits=edits, reqs=requests_)
        def check(edits: list[tuple[str, str]], reqs: list[Request]) -> None:
            rules = tmp_path / f"rules-{next(examples)}"
            rules.mkdir()
            (rules / "base.yaml").write_text(BASE)
            (rules / "agents.yaml").write_text("agents:\n" + agent("bot", ["ok"]))
            (rules / "defaults.yaml").write_text("defaults: {unknown_agents: deny}\n")
            tctx.configure(fw, axme_rules=str(rules), axme_state=str(tmp_path / "state"))
            last_good: Ruleset = load_dir(rules)
            for name, text in edits:
                (rules / name).write_text(text)
                with contextlib.suppress(RulesError):  # the oracle keeps its last good rules
                    last_good = load_dir(rules)
                reload_now(fw)
                for req in reqs:
                    probe(fw, last_good, req, edits)
            shutil.rmtree(rules)

        check()
    if fw.audit is not None:
        fw.audit.close()


Request = tuple[str | None, bool, str, str, list[str], str]


def probe(fw: Firewall, last_good: Ruleset, req: Request, edits: object) -> None:
    user, right, method, host, segs, query = req
    raw_path = "/" + "/".join(segs) + query
    token = (TOKENS.get(user, "x") if right else "wrong") if user else None
    f = tflow.tflow()
    f.request.host, f.request.port = host, 443
    f.request.method = method
    f.request.path = raw_path
    if user is not None:
        cred = base64.b64encode(f"{user}:{token}".encode()).decode()
        f.request.headers["Proxy-Authorization"] = f"Basic {cred}"
    fw.requestheaders(f)
    forwarded = f.response is None
    ref = reference(method, host, raw_path)
    if ref is None:
        assert not forwarded, (edits, req)
        return
    m, h, p = ref
    d = decide(last_good, Facts(user, token, h, 443, m, p))
    if d.refused:
        assert not forwarded, (d, edits, req)
    if forwarded:  # and what goes upstream is what the rules matched
        assert reference(m, f.request.host, f.request.path) == ref, (edits, req)
