"""The mitmproxy addon's hooks: identity, decisions, limits, metering, kill, park, cut.

Load it with ``axme-fw run`` or ``mitmdump -s addon/script.py --set axme_rules=rules``.

Failing closed: mitmproxy logs an exception raised in a hook and then *forwards the
flow*. Every hook that decides is wrapped by :func:`_fail_closed`, which turns any
exception into a 403 ``internal_error`` refusal.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import fnmatch
import functools
import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions, http, tcp
from mitmproxy.connection import Client
from mitmproxy.net.http import url

from . import admin, canonical, killswitch, snapshot
from . import audit as audit_mod
from .alerts import Alerter
from .answers import refusal
from .cost import (
    ApiKind,
    Pricing,
    PricingError,
    StreamScanner,
    detect_api,
    load_pricing,
    usage_from_json,
)
from .health import Health, stale_after
from .identity import instance_of, parse_proxy_auth
from .inflight import cut_clients
from .limits import (
    Exceeded,
    LimitSpec,
    OnExceed,
    Windows,
    assume_lost,
    retry_after_header,
)
from .meter import Call, Meter, Refused, cost_detail, usage_rows
from .parking import ParkingLot
from .policy import ANONYMOUS, Decision, Facts, Verdict, decide, identify
from .rules import (
    EMPTY,
    KILL_FILE,
    PRICING_FILE,
    Agent,
    Kill,
    Loader,
    RulesError,
    Ruleset,
    atomic_write,
)
from .state import LIVE_FILE, Store
from .watch import RulesWatcher
from .yamlnodes import format_duration

log = logging.getLogger(__name__)

CONTROL_HOST = "axme-fw.local"  # answered by the proxy itself, never forwarded
HOST_MISMATCH = "host_mismatch"
TWO_CREDENTIALS = "\0two"  # take_headers: more than one Proxy-Authorization header
AMBIGUOUS_LENGTH = "ambiguous_length"
HEADERS_TOO_LARGE = "headers_too_large"
MAX_HEADERS = 64 << 10  # request header bytes: more is abuse, not an API call
SWEEP_INTERVAL = 0.25  # staleness checks
META_AGENT = "axme_fw.agent"
META_LLM = "axme_fw.llm"  # the ApiKind of an LLM call
META_CALL = "axme_fw.call"  # its meter.Call, once reserved


FLUSH_INTERVAL = 1.0
MAX_JSON_BODY = 8 << 20  # an LLM JSON answer larger than this is not read for usage


@dataclasses.dataclass(frozen=True)
class AgentSpecs:
    """An agent's limits, prepared once per rules load for the per-request path."""

    requests: tuple[LimitSpec, ...]
    actions: dict[str, tuple[LimitSpec, ...]]
    cost: LimitSpec | None

    def all(self) -> list[LimitSpec]:
        out = [*self.requests, *(s for specs in self.actions.values() for s in specs)]
        return [*out, self.cost] if self.cost is not None else out


def agent_specs(limits: Sequence[Any]) -> AgentSpecs:
    requests: list[LimitSpec] = []
    actions: dict[str, tuple[LimitSpec, ...]] = {}
    cost = None
    for lim in limits:
        spec = LimitSpec(lim.key, lim.max, lim.per, OnExceed(lim.on_exceed), lim.warn_at)
        if lim.key == "requests":
            requests.append(spec)
        elif lim.key == "cost_usd":
            cost = spec
        else:
            name = lim.key.removeprefix("actions.")
            actions[name] = (*actions.get(name, ()), spec)
    return AgentSpecs(tuple(requests), actions, cost)


def limit_detail(ex: Exceeded) -> str:
    """``limits.actions.deploy: max 3 per 6h reached (3 used)``: for people and kill.yaml."""
    spec = ex.spec
    return (
        f"limits.{spec.key}: max {spec.max:g} per {format_duration(spec.per)} reached "
        f"({ex.used:g} used)"
    )


def load_pricing_file(rules_dir: Path) -> Pricing | PricingError | None:
    """``rules/pricing.yaml`` (None when absent: LLM calls of agents with a cost ceiling
    are then refused as unpriced, since their spend cannot be known)."""
    path = rules_dir / PRICING_FILE
    if not path.exists():
        return None
    try:
        return load_pricing(path)
    except PricingError as exc:
        return exc
    except OSError as exc:
        return PricingError(f"{path}:1: cannot read: {exc}")


def with_include_usage(body: bytes) -> bytes | None:
    """A streamed chat completion body with ``stream_options.include_usage`` set, or None."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict):
        return None
    opts = obj.get("stream_options")
    obj["stream_options"] = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
    return json.dumps(obj).encode()


def with_kill(rules: Ruleset, kill: Kill) -> Ruleset:
    """``rules`` with ``kill`` first in the kill list."""
    return rules.with_kills((kill, *rules.kills))


_AUTH = b"proxy-authorization"
_INSTANCE = b"x-agent-instance"


def take_headers(req: http.Request) -> tuple[str | None, str | None]:
    """Remove Proxy-Authorization and X-Agent-Instance in one pass; return their values.

    Neither may leave the proxy. One pass over the raw fields instead of two
    ``headers.pop`` calls: this runs on every request.
    """
    auth = instance = None
    keep = []
    for name, value in req.headers.fields:
        low = name.lower()
        if low == _AUTH:
            # Two credentials are no credentials: which one a hop reads is a guess.
            auth = value.decode("latin-1") if auth is None else TWO_CREDENTIALS
        elif low == _INSTANCE:
            instance = value.decode("latin-1")
        else:
            keep.append((name, value))
    if auth is not None or instance is not None:
        req.headers.fields = tuple(keep)
    return auth, instance


def _write_json(path: Path, build: Callable[[Ruleset], object], rules: Ruleset) -> None:
    atomic_write(path, json.dumps(build(rules)))


def _active(flow: http.HTTPFlow) -> bool:
    """Whether a flow is still in progress (no answer yet, streaming, or a live websocket)."""
    if flow.error is not None:
        return False
    if flow.websocket is not None:
        return flow.websocket.timestamp_end is None
    return flow.response is None or flow.response.timestamp_end is None


def _fail_closed[F: Callable[..., Any]](hook: F) -> F:
    """Refuse the flow if the hook raises: never let mitmproxy forward it."""

    @functools.wraps(hook)
    def wrapper(self: Firewall, flow: http.HTTPFlow) -> None:
        try:
            hook(self, flow)
        except Exception:
            log.exception("axme-fw: %s failed; refusing the flow", hook.__name__)
            try:
                if flow.intercepted:
                    flow.resume()
                flow.response = refusal(403, "internal_error", None, "the firewall failed closed")
            except Exception:  # pragma: no cover - last resort
                flow.kill()

    return wrapper  # type: ignore[return-value]


class Firewall:
    name = "axme_fw"

    def __init__(self) -> None:
        self.rules: Ruleset = EMPTY
        self.loader: Loader | None = None
        self.state_dir: Path | None = None
        self.audit: audit_mod.AuditWriter | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.watcher: Any = None
        # Credentials remembered per client connection after a CONNECT (requests inside
        # the tunnel carry none of their own).
        self.tunnel_auth: dict[str, tuple[str, str]] = {}
        self.tunnel_target: dict[str, tuple[str, int]] = {}  # client id → CONNECT host, port
        self.conn_agent: dict[str, str] = {}  # client connection id → agent
        self.live: dict[str, set[str]] = {}  # agent → client ids with work in progress
        self.inflight: dict[str, set[http.HTTPFlow]] = {}  # client id → flows in progress
        self.passthrough: set[str] = set()  # CONNECT tunnels with no request seen inside (yet)
        self.lot = ParkingLot(self._audit, self._touch_live, self._park_limits)
        self.health = Health()
        self._verified: dict[tuple[str, str], Agent] = {}  # (user, token) → agent, this ruleset
        # LLM calls reserved and not yet settled, swept in case a flow ends unseen.
        self.open_calls: dict[int, tuple[http.HTTPFlow, Call]] = {}
        self._health_dirty = False
        self._published: tuple[object, ...] = ()
        self.admin_listen: admin.Listen | None = admin.parse_listen(admin.DEFAULT_LISTEN)
        self.admin: admin.AdminServer | None = None
        self.admin_targets: frozenset[tuple[str, int]] = frozenset()
        self.alerter: Alerter | None = None
        self._reloading = False
        self._reload_again = False
        self._live_timer: asyncio.TimerHandle | None = None
        self._closing: set[str] = set()  # answered at shutdown, not yet disconnected
        # Limits: the hot path is in memory; the durable copy is flushed off the loop.
        self.windows = Windows()
        self.meter = Meter(self.windows, None)
        self.specs: dict[str, AgentSpecs] = {}
        # Auto-kills enforced in memory until kill.yaml has them: agent → (kill, written).
        self.pending_kills: dict[str, tuple[Kill, bool]] = {}
        self.store: Store | None = None
        self._windows_dirty = False
        self._flush_timer: asyncio.TimerHandle | None = None
        # One writer thread for state files: writes land in the order they were asked.
        self.writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="axme-fw-state")

    # ------------------------------------------------------------ lifecycle

    def load(self, loader: Any) -> None:
        loader.add_option("axme_rules", str, "rules", "axme-fw: the rules directory")
        loader.add_option("axme_state", str, "state", "axme-fw: the state directory")
        loader.add_option(
            "axme_admin_listen", str, admin.DEFAULT_LISTEN, "axme-fw: admin HOST:PORT, or off"
        )
        loader.add_option("axme_admin_cert", str, "", "axme-fw: admin TLS certificate (PEM)")
        loader.add_option("axme_admin_key", str, "", "axme-fw: admin TLS key (PEM)")
        loader.add_option(
            "axme_admin_insecure", bool, False, "axme-fw: plain HTTP admin off loopback"
        )

    def configure(self, updated: set[str]) -> None:
        if "connection_strategy" in updated and ctx.options.connection_strategy != "lazy":
            # Eager connects upstream before our hooks run: a refused flow would touch upstream.
            ctx.options.update(connection_strategy="lazy")
        if "validate_inbound_headers" in updated and not ctx.options.validate_inbound_headers:
            # Request smuggling checks stay on: an egress firewall never trusts framing.
            ctx.options.update(validate_inbound_headers=True)
        if updated & {"axme_admin_listen", "axme_admin_cert", "axme_admin_key"} or (
            "axme_admin_insecure" in updated
        ):
            o = ctx.options
            try:
                self.admin_listen = admin.parse_listen(o.axme_admin_listen)
                admin.check(
                    self.admin_listen, o.axme_admin_cert, o.axme_admin_key, o.axme_admin_insecure
                )
            except admin.AdminConfigError as exc:
                raise exceptions.OptionsError(f"axme-fw: {exc}") from None
        if "axme_rules" in updated or self.loader is None:
            self.loader = Loader(Path(ctx.options.axme_rules))
            try:
                rules = self.loader.load()
            except RulesError as exc:
                # At start-up there are no last good rules: refuse to start (fail closed).
                # OptionsError makes mitmdump print the message and exit 1, no traceback.
                raise exceptions.OptionsError("axme-fw: invalid rules:\n" + str(exc)) from None
            self._install(rules, initial=True)
            loaded = load_pricing_file(self.loader.directory)
            if isinstance(loaded, PricingError):
                raise exceptions.OptionsError(f"axme-fw: invalid pricing: {loaded}")
            self.meter.pricing = loaded
        if "axme_state" in updated or self.state_dir is None:
            self.state_dir = Path(ctx.options.axme_state)
            self.state_dir.mkdir(parents=True, exist_ok=True)
            if self.audit is not None:
                self.audit.close()
            self.audit = audit_mod.AuditWriter(self.state_dir)
            self.store = Store(self.state_dir)
            saved = self.store.load("windows")  # once, at start-up, before traffic
            if saved is not None:
                if saved.get("clean") is not True:  # a crash: err on the side of refusing
                    at = saved.get("saved_at")
                    at = at if isinstance(at, int | float) else time.time()
                    saved = assume_lost(saved, float(at), FLUSH_INTERVAL)
                    self._audit("limits.restored_after_crash", saved_at=at)
                self.windows = Windows.restore(saved, time.time())
                self.meter.windows = self.windows
            health = self.store.load("health")
            if health is not None:
                self.health = Health.restore(health)
            if self.alerter is None:
                self.alerter = Alerter(lambda event, fields: self._audit(event, **fields))
                self.alerter.alerts = self.rules.alerts

    def running(self) -> None:
        self.loop = self.lot.loop = asyncio.get_running_loop()

        if self.loader is not None:
            self.watcher = RulesWatcher(self.loader.directory, self.loop, self.reload)
            self.watcher.start()
        self._start_admin()
        self._audit("proxy.started", rules=self.rules.digest, pid=os.getpid())
        self._write_enforced()
        self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    def _start_admin(self) -> None:
        listen = self.admin_listen
        if listen is None or self.state_dir is None:
            return
        o = ctx.options
        server = admin.AdminServer(
            listen,
            self.state_dir,
            self.state_dir / audit_mod.AUDIT_FILE,
            rules_loaded=lambda: self.loader is not None,
            audit_failing=lambda: self.audit is not None and self.audit.failing,
            cert=o.axme_admin_cert,
            key=o.axme_admin_key,
        )
        try:
            server.start()
        except OSError as exc:
            # An ERROR at start-up makes mitmdump exit 1: an operator must see this.
            log.error(
                "axme-fw: cannot serve the admin API on %s:%s: %s", listen.host, listen.port, exc
            )
            ctx.master.shutdown()
            return
        self.admin = server
        self.admin_targets = admin.admin_targets(listen, server.port)
        scheme = "https" if o.axme_admin_cert else "http"
        log.info("axme-fw: admin API on %s://%s:%d", scheme, listen.host, server.port)
        if not o.axme_admin_cert and not admin.is_loopback(listen.host):
            log.warning(
                "axme-fw: the admin API is plain HTTP on %s (--admin-insecure)", listen.host
            )

    async def done(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        if self.admin is not None:
            self.admin.stop()
        # Parked flows are not answered for us: answer 503 (never forward, never hang),
        # then give their connections a moment to send it before the loop stops.
        self._closing = self.lot.answer_all(503, "proxy_shutdown", "the proxy is shutting down")
        deadline = time.monotonic() + 3.0
        while self._closing and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self.store is not None:
            self.writer.shutdown(wait=True)  # pending state writes first
            self.store.save("windows", {**self.windows.snapshot(), "clean": True})
            self.store.save("health", self.health.snapshot())
            self.store.close()
        self._audit("proxy.stopped", pid=os.getpid())
        if self.state_dir is not None:
            (self.state_dir / LIVE_FILE).unlink(missing_ok=True)
        if self.alerter is not None:
            self.alerter.close()
        if self.audit is not None:
            self.audit.close()

    # ------------------------------------------------------------ rules

    def reload(self, changed: frozenset[str] = frozenset()) -> None:
        """Re-read the rules off the loop; swap on the loop; keep the old ones if invalid.

        A change to kill.yaml alone takes a fast path on the loop (parse one small file,
        no thread hop): a kill must not wait behind a 10,000-agent merge or the GIL.
        """
        assert self.loop is not None and self.loader is not None
        if changed == {KILL_FILE} and not self._reloading:
            started = time.monotonic()
            try:
                rules = self.loader.load_kills(self.rules)
            except RulesError as exc:
                self._rejected(exc)
                return
            if rules is not None:
                self._swap(rules, started)
                return
        if self._reloading:
            self._reload_again = True
            return
        self._reloading = True
        started = time.monotonic()
        loader = self.loader

        def load_both() -> tuple[Ruleset, Pricing | PricingError | None]:
            return loader.load(), load_pricing_file(loader.directory)

        future = self.loop.run_in_executor(None, load_both)
        future.add_done_callback(functools.partial(self._reloaded, started))

    def _reloaded(
        self, started: float, future: asyncio.Future[tuple[Ruleset, Pricing | PricingError | None]]
    ) -> None:
        self._reloading = False
        try:
            rules, pricing = future.result()
            if isinstance(pricing, PricingError):
                log.error("axme-fw: pricing rejected, keeping the last good prices: %s", pricing)
                self._audit("rules.rejected", errors=[str(pricing)], kept="pricing")
            elif pricing != self.meter.pricing:
                self.meter.pricing = pricing
                self._audit("pricing.reloaded", models=len(pricing.prices) if pricing else 0)
        except RulesError as exc:
            self._rejected(exc)
        except Exception as exc:  # unexpected: keep the last good rules, say so
            log.exception("axme-fw: rules reload failed; keeping the last good rules")
            self._audit("rules.rejected", errors=[repr(exc)], kept=self.rules.digest)
        else:
            self._swap(rules, started)
        if self._reload_again:
            self._reload_again = False
            self.reload()

    def _rejected(self, exc: RulesError) -> None:
        log.error("axme-fw: rules rejected, keeping the last good rules:\n%s", exc)
        self._audit("rules.rejected", errors=exc.messages[:50], kept=self.rules.digest)
        self._alert("rules.rejected", agent="-", reason=exc.messages[0], errors=len(exc.messages))

    def _swap(self, rules: Ruleset, started: float) -> None:
        if rules.digest == self.rules.digest:
            return
        self._install(rules)
        ms = round((time.monotonic() - started) * 1000, 2)
        self._audit("rules.reloaded", rules=rules.digest, revision=rules.kill_revision, ms=ms)
        self._write_enforced()

    def _install(self, rules: Ruleset, initial: bool = False, spare: str | None = None) -> None:
        """Swap in ``rules``; cut in-flight work of newly killed agents (except ``spare``)."""
        for agent, (pending, written) in list(self.pending_kills.items()):
            if written or rules.kill_for(agent) is not None:
                # kill.yaml has it (or had it: from here on the file is the truth,
                # so `axme-fw resume` works as for any kill).
                del self.pending_kills[agent]
            else:
                rules = with_kill(rules, pending)  # not in kill.yaml yet: keep enforcing it
        old, self.rules = self.rules, rules
        if old.agents is not rules.agents:  # tokens or limits may have changed
            self._verified = {}
            self.specs = {
                name: agent_specs(a.limits) for name, a in rules.agents.items() if a.limits
            }
        timeout = rules.defaults.park_timeout
        if ctx.options.tcp_timeout < timeout + 60:
            # mitmproxy closes idle connections after tcp_timeout: parked ones included.
            ctx.options.update(tcp_timeout=int(timeout + 60))
        if self.alerter is not None:
            self.alerter.alerts = rules.alerts
        if initial or old.kills == rules.kills:
            return
        self._kill_alerts(old, rules)
        for agent in list(self.live):
            kill = rules.kill_for(agent)
            if (
                kill is not None
                and kill.mode == "block"
                and old.kill_for(agent) != kill
                and agent != spare
            ):
                connections, flows = self.cut(agent, kill)
                self._audit(
                    "kill.enforced",
                    agent=agent,
                    pattern=kill.agent,
                    flows_cut=flows,
                    connections_cut=connections,
                    revision=rules.kill_revision,
                )
        for agent in self.lot.agents():
            kill = rules.kill_for(agent)
            if kill is None:
                self.lot.release(agent)
            elif kill.mode == "block":
                self.lot.answer(agent, 403, "agent_killed", kill.reason, kill)

    def _kill_alerts(self, old: Ruleset, new: Ruleset) -> None:
        """Alert (and reset health) for kill-list entries that appeared, changed or went."""
        before = {k.agent: k for k in old.kills}
        after = {k.agent: k for k in new.kills}
        for pattern, kill in after.items():
            if before.get(pattern) != kill:
                if kill.by.startswith("policy:"):
                    event = "agent.auto_killed"
                else:
                    event = "agent.paused" if kill.mode == "park" else "agent.killed"
                self._alert(event, agent=pattern, mode=kill.mode, reason=kill.reason, by=kill.by)
        now = time.time()
        for pattern in before.keys() - after.keys():
            self._alert("agent.resumed", agent=pattern, by=before[pattern].by)
            for agent in list(self.health.agents):
                if fnmatch.fnmatchcase(agent, pattern):
                    self.health.reset(agent, now)

    def _alert(self, event: str, **fields: Any) -> None:
        if self.alerter is not None:
            self.alerter.send(event, at=audit_mod.now_iso(), **fields)

    def _stale_after(self, agent: str) -> float:
        return stale_after(self.rules, agent)

    def _sweep(self) -> None:
        """Every SWEEP_INTERVAL: mark agents with no traffic for stale_after; alert once."""
        assert self.loop is not None
        try:
            for agent in self.health.sweep(time.time(), self._stale_after):
                self._health_dirty = True
                if self.rules.kill_for(agent) is None:  # a killed agent is quiet by design
                    self._audit("agent.stale", agent=agent, stale_after=self._stale_after(agent))
                    self._alert("agent.stale", agent=agent, reason="no traffic or heartbeat")
            for flow, call in list(self.open_calls.values()):
                if not _active(flow):  # ended without our reader seeing the end
                    self._meter_end(flow, call, complete=flow.error is None)
            if self._health_dirty:
                self._touch_live()
                self._windows_changed()  # the durable copy carries health too
        except Exception:
            log.exception("axme-fw: health sweep failed")
        self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    def _heartbeat(self, agent: str, flow: http.HTTPFlow, header: str | None) -> str:
        peer = flow.client_conn.peername[0] if flow.client_conn.peername else None
        instance = instance_of(peer, header)
        if self.health.saw(agent, instance, time.time()):
            self._audit("agent.recovered", agent=agent)
            self._alert("agent.recovered", agent=agent, reason="traffic again")
        self._health_dirty = True
        return instance

    def _write_enforced(self) -> None:
        if self.state_dir is None or self.loop is None:
            return
        addrs = []
        try:
            ps = ctx.master.addons.get("proxyserver")
            addrs = [f"{h}:{p}" for h, p, *_ in ps.listen_addrs()]
        except Exception:  # the test harness has no proxyserver
            pass
        rules = self.rules
        published = (rules.agents, rules.actions, rules.defaults)
        if len(published) != len(self._published) or any(
            a is not b for a, b in zip(published, self._published, strict=True)
        ):
            # What status and env read while a file on disk is broken (built off the loop).
            self._published = published
            path = self.state_dir / snapshot.RULES_FILE
            self.loop.run_in_executor(self.writer, _write_json, path, snapshot.rules_json, rules)
        data = {
            "revision": rules.kill_revision,
            "rules": rules.digest,
            "pid": os.getpid(),
            "listen": addrs,
            "at": audit_mod.now_iso(),
            "kills": snapshot.kills_json(rules),
            "admin": f"{self.admin_listen.host}:{self.admin.port}"
            if self.admin is not None and self.admin_listen is not None
            else None,
        }
        path = self.state_dir / killswitch.ENFORCED_FILE
        self.loop.run_in_executor(self.writer, atomic_write, path, json.dumps(data))

    def _touch_live(self) -> None:
        """Schedule a ``live.json`` snapshot (coalesced, written off the loop)."""
        if self._live_timer is None and self.loop is not None:
            self._live_timer = self.loop.call_later(0.1, self._flush_live)

    def _flush_live(self) -> None:
        self._live_timer = None
        if self.state_dir is None or self.loop is None:
            return
        data = {
            "pid": os.getpid(),
            "at": audit_mod.now_iso(),
            "parked": self.lot.counts(),
            "health": self.health.snapshot(),
            "limits": self._usage(time.time()),
        }
        self.loop.run_in_executor(
            self.writer, atomic_write, self.state_dir / LIVE_FILE, json.dumps(data)
        )

    # ------------------------------------------------------------ decisions

    def _facts(self, flow: http.HTTPFlow, header: str | None) -> tuple[Facts, Decision | None]:
        """Request facts in their one canonical spelling, and a refusal when there is none.

        ``header`` is the Proxy-Authorization value already taken off. A path that
        canonicalises differently from how it was sent is rewritten on the flow (the
        upstream reads what the rules matched); one that cannot be read one way only,
        a host spelled another way, a Host header or SNI that names another host than the
        destination, or an ambiguous body length is refused, after identity (see
        :mod:`axme_fw.canonical`).
        """
        req = flow.request
        if header is TWO_CREDENTIALS:
            no = Facts(None, None, req.host.lower(), req.port, req.method, "")
            return no, Decision(Verdict.AUTH, "auth_required", None, "two Proxy-Authorization")
        creds = parse_proxy_auth(header) if header else None
        if creds is None:
            creds = self.tunnel_auth.get(flow.client_conn.id)
        user, token = creds if creds is not None else (None, None)
        is_connect = req.method == "CONNECT"
        try:
            host = canonical.host(req.host)  # the destination, also for CONNECT
            # mitmproxy upper-cases .method but sends the bytes as they came: check those.
            method = canonical.method(req.data.method.decode("utf-8", "replace"))
            path = ""
            if not is_connect:
                p = canonical.path(req.path)
                if p.changed:
                    req.path = p.target
                path = p.match
            facts = Facts(user, token, host, req.port, method, path)
            if not is_connect:
                self._check_target(flow, facts)
                if req.host != host:
                    req.host = host  # connect to the spelling the rules matched
        except canonical.NotCanonical as exc:
            raw = Facts(user, token, req.host.lower(), req.port, req.method, "")
            agent, refused = identify(self.rules, user, token)
            if refused is not None:
                return raw, refused
            name = agent.name if agent is not None else (user or ANONYMOUS)
            return raw, Decision(Verdict.DENY, exc.reason, name, exc.detail)
        return facts, None

    def _to_admin(self, facts: Facts) -> Decision | None:
        """Agents never reach the admin listener through the proxy, whatever they may."""
        if (facts.host, facts.port) not in self.admin_targets:
            return None
        agent, refused = identify(self.rules, facts.user, facts.token)
        if refused is not None:
            return refused
        name = agent.name if agent is not None else (facts.user or ANONYMOUS)
        return Decision(Verdict.DENY, "control_forbidden", name, "the admin API is for operators")

    def _check_target(self, flow: http.HTTPFlow, facts: Facts) -> None:
        """Raise when the request names another host than where it goes, or its body
        length is ambiguous (mitmproxy checks that too, unless validate_inbound_headers
        is turned off: this check does not depend on it)."""
        req = flow.request
        size = sum(len(k) + len(v) + 4 for k, v in req.headers.fields)
        if size > MAX_HEADERS:
            raise canonical.NotCanonical(
                HEADERS_TOO_LARGE, f"request headers of {size} bytes (at most {MAX_HEADERS})"
            )
        target = self.tunnel_target.get(flow.client_conn.id)
        if target is not None and target != (facts.host, facts.port):
            raise canonical.NotCanonical(
                HOST_MISMATCH,
                f"request for {facts.host}:{facts.port} inside a tunnel to {target[0]}:{target[1]}",
            )
        names = [req.authority] if req.authority else []
        names += req.headers.get_all("host")
        sni = flow.client_conn.sni if target is not None else None
        if sni:
            names.append(f"{sni}:{facts.port}")
        if len(req.headers.get_all("host")) > 1:
            raise canonical.NotCanonical(HOST_MISMATCH, "more than one Host header")
        default = 443 if req.scheme == "https" else 80
        for name in names:
            try:
                h, p = url.parse_authority(name, check=True)
            except ValueError:
                raise canonical.NotCanonical(HOST_MISMATCH, f"bad Host {name[:100]!r}") from None
            if canonical.host(h) != facts.host or (p or default) != facts.port:
                raise canonical.NotCanonical(
                    HOST_MISMATCH, f"Host {name[:100]!r} is not {facts.host}:{facts.port}"
                )
        lengths = req.headers.get_all("content-length")
        if (lengths and "transfer-encoding" in req.headers) or len(lengths) > 1:
            raise canonical.NotCanonical(
                AMBIGUOUS_LENGTH, "both Content-Length and Transfer-Encoding, or two lengths"
            )

    def _decide(self, facts: Facts) -> Decision:
        """:func:`policy.decide`, with verified credentials remembered for this ruleset.

        Only credentials that matched are remembered (a wrong token is hashed every
        time, so guesses cannot fill memory); the cache is dropped with the ruleset.
        """
        if facts.user is None or facts.token is None:
            return decide(self.rules, facts)
        key = (facts.user, facts.token)
        agent = self._verified.get(key)
        d = decide(self.rules, facts, agent)
        if agent is None and d.reason != "unknown_agent" and facts.user in self.rules.agents:
            self._verified[key] = self.rules.agents[facts.user]
        return d

    def _audit(self, event: str, **fields: Any) -> None:
        if self.audit is not None:
            self.audit.write(event, **fields)

    def _audit_decision(self, flow: http.HTTPFlow, d: Decision, would: bool = False) -> None:
        policy = self.rules.defaults.audit_decisions
        if policy == "none" or (policy == "denied" and not d.refused):
            return
        req = flow.request
        self._audit(
            "decision",
            agent=d.agent,
            instance=flow.client_conn.peername[0] if flow.client_conn.peername else None,
            verdict=("would_" + d.verdict.value) if would else d.verdict.value,
            reason=d.reason,
            detail=d.detail,
            method=req.method,
            host=req.host,
            path=req.path.split("?", 1)[0] if req.method != "CONNECT" else "",
        )

    def _apply(self, flow: http.HTTPFlow, d: Decision) -> bool:
        """Apply a decision to the flow; True when the flow goes on upstream."""
        report = self.rules.defaults.mode == "report" and d.reason != "agent_killed"
        if d.refused and report and d.verdict is not Verdict.AUTH:
            self._audit_decision(flow, d, would=True)
            log.info("axme-fw: would %s %s (%s): %s", d.verdict, d.agent, d.reason, d.detail)
            return True
        self._audit_decision(flow, d)
        if d.verdict is Verdict.FORWARD:
            return True
        if d.verdict is Verdict.PARK:  # a passthrough CONNECT parks the tunnel itself
            assert d.agent is not None
            self.lot.park(flow, d.agent)
        else:
            self._refuse(flow, d)
        return False

    def _refuse_always(self, flow: http.HTTPFlow, d: Decision) -> None:
        """Refuse a request that cannot be matched safely, report mode or not: there is
        no "would" for a path or host that means two things."""
        self._audit_decision(flow, d)
        self._refuse(flow, d)

    def _refuse(self, flow: http.HTTPFlow, d: Decision) -> None:
        """Answer 407 or 403 for ``d`` (report mode does not apply: see callers)."""
        if d.verdict is Verdict.AUTH:
            flow.response = refusal(407, d.reason, None, d.detail)
        else:
            status = 431 if d.reason == HEADERS_TOO_LARGE else 403
            flow.response = refusal(status, d.reason, d.agent, d.detail, d.kill)

    @_fail_closed
    def http_connect(self, flow: http.HTTPFlow) -> None:
        auth, _instance = take_headers(flow.request)
        facts, bad = self._facts(flow, auth)
        bad = bad or self._to_admin(facts)
        if bad is not None:
            self._refuse_always(flow, bad)
            return
        cid = flow.client_conn.id
        if facts.user is not None and facts.token is not None:
            self.tunnel_auth[cid] = (facts.user, facts.token)
        self.tunnel_target[cid] = (facts.host, facts.port)
        if facts.host == CONTROL_HOST:  # identity only: requests inside are answered by us
            _agent, refused = identify(self.rules, facts.user, facts.token)
            if refused is not None:
                self._refuse(flow, refused)
            return
        d = self._decide(facts)
        if d.agent is not None and d.reason != "unknown_agent":
            self._heartbeat(d.agent, flow, None)
        if d.reason == "agent_killed" and not d.inbound and not self._passes_through(facts):
            # The agent is identified and the tunnel will be intercepted: let it open, so
            # every request inside gets the JSON 403 (a 403 to CONNECT loses its body and
            # SDKs retry it). With connection_strategy=lazy nothing reaches upstream.
            self._audit_decision(flow, d)
            assert d.agent is not None
            self._track(cid, d.agent)
            return
        if self._apply(flow, d) and d.agent is not None:
            self._track(cid, d.agent)
            self.passthrough.add(cid)

    def _passes_through(self, facts: Facts) -> bool:
        """Whether mitmproxy will tunnel this CONNECT without intercepting it (err towards yes)."""
        opts = ctx.options
        addr = f"{facts.host}:{facts.port}"
        if opts.allow_hosts and not any(
            re.search(x, addr, re.IGNORECASE) for x in opts.allow_hosts
        ):
            return True
        return any(re.search(x, addr, re.IGNORECASE) for x in (*opts.ignore_hosts, *opts.tcp_hosts))

    @_fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:  # answered by another addon already
            return
        auth, instance_header = take_headers(flow.request)
        facts, bad = self._facts(flow, auth)
        bad = bad or self._to_admin(facts)
        if bad is not None:
            self._refuse_always(flow, bad)
            return
        if facts.host == CONTROL_HOST:
            self._control(flow, facts, instance_header)
            return
        d = self._decide(facts)
        if d.agent is not None and d.reason != "unknown_agent":
            flow.metadata[META_AGENT] = d.agent
            self._heartbeat(d.agent, flow, instance_header)
        cid = flow.client_conn.id
        self.passthrough.discard(cid)
        if self._apply(flow, d) and d.agent is not None:
            if d.agent in self.specs and not self._admit(flow, d):
                return
            self._track(cid, d.agent)
            # Requests on one connection are mostly sequential: drop what has finished.
            flows = self.inflight.get(cid)
            if flows is None:
                self.inflight[cid] = {flow}
            else:
                flows.intersection_update([f for f in flows if _active(f)])
                flows.add(flow)
            kind = detect_api(facts.method, facts.path)
            if kind is not None:
                flow.metadata[META_LLM] = kind
                # We read usage from the response: ask for it uncompressed.
                flow.request.headers["accept-encoding"] = "identity"

    def _control(self, flow: http.HTTPFlow, facts: Facts, instance_header: str | None) -> None:
        """``http://axme-fw.local/heartbeat`` and ``/status``: answered here, never forwarded.

        Authenticated by the same proxy credentials. An agent reads its own status; there
        is no endpoint that changes anything (resume, kill, limits are the operator's).
        """
        agent, refused = identify(self.rules, facts.user, facts.token)
        if refused is not None:
            self._refuse(flow, refused)
            return
        name = agent.name if agent is not None else (facts.user or "anonymous")
        path = flow.request.path.split("?", 1)[0].rstrip("/")
        if path not in ("/heartbeat", "/status"):
            flow.response = refusal(
                403,
                "control_forbidden",
                name,
                "agents can report in (/heartbeat) and read their status (/status); "
                "they cannot change anything",
            )
            return
        if flow.request.method not in ("GET", "POST", "HEAD"):
            flow.response = refusal(405, "control_forbidden", name, "use GET or POST")
            return
        instance = self._heartbeat(name, flow, instance_header)
        kill = self.rules.kill_for(name)
        seen = self.health.agents.get(name)
        body = {
            "agent": name,
            "instance": instance,
            "state": self.health.state(name, kill.mode if kill is not None else None),
            "kill": {"reason": kill.reason, "by": kill.by, "at": kill.at, "mode": kill.mode}
            if kill is not None
            else None,
            "limits": self._usage(time.time(), only=name).get(name, []),
            "requests": seen.requests if seen is not None else 0,
            "parked": self.lot.counts().get(name, 0),
        }
        flow.response = http.Response.make(
            200, json.dumps(body).encode() + b"\n", {"Content-Type": "application/json"}
        )

    @_fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        """LLM calls: reserve the worst-case cost before the request is sent."""
        kind = flow.metadata.get(META_LLM)
        agent = flow.metadata.get(META_AGENT)
        if kind is None or agent is None or flow.response is not None:
            return
        entry = self.specs.get(agent)
        spec = entry.cost if entry is not None else None
        body = flow.request.get_content(strict=False) or b""
        got = self.meter.begin(agent, kind, flow.request.path, body, spec, time.time())
        if isinstance(got, Refused):
            if self.rules.defaults.mode == "report":
                self._audit("cost.would_refuse", agent=agent, reason=got.reason, detail=got.detail)
                return
            if got.exceeded is not None:
                self._exceeded(flow, agent, got.exceeded, got.detail)
            else:
                flow.response = refusal(403, got.reason, agent, got.detail)
                self._audit("cost.refused", agent=agent, reason=got.reason, detail=got.detail)
            return
        flow.metadata[META_CALL] = got
        self.open_calls[id(got)] = (flow, got)
        if kind is ApiKind.OPENAI_CHAT and got.estimate.stream and not got.estimate.include_usage:
            # Streamed chat completions report usage only when asked to: ask (documented).
            patched = with_include_usage(body)
            if patched is not None:
                flow.request.set_content(patched)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """Stream SSE at once; read LLM responses as they pass, settling at their end.

        Every LLM response is streamed through a callable (never buffered, JSON
        included): the callable sees the last chunk, so no ``response`` hook is needed
        on the per-request path. A failure here settles the call at once (charged its
        prompt estimate): a reservation must never be left open.
        """
        resp = flow.response
        if resp is None:
            return
        call = flow.metadata.get(META_CALL)
        try:
            sse = resp.headers.get("content-type", "").startswith("text/event-stream")
            if call is not None:
                if sse or call.kind is ApiKind.GEMINI_STREAM:
                    call.scanner = StreamScanner(
                        call.kind, resp.headers.get("content-encoding"), call.path_model
                    )
                else:
                    call.body = bytearray()
                resp.stream = self._metering(flow, call)
            elif sse:
                resp.stream = True  # never buffer a stream: pass each chunk on at once
        except Exception:  # streaming and metering must never break the flow
            log.exception("axme-fw: responseheaders failed")
            if call is not None:
                self._meter_end(flow, call, complete=False)

    def _metering(self, flow: http.HTTPFlow, call: Call) -> Callable[[bytes], bytes]:
        """A ``response.stream`` callable: pass every byte on unchanged and at once, feed
        the usage reader, settle on the final empty chunk. Never raises (a raise here
        would stall the client connection)."""

        def chunk(data: bytes) -> bytes:
            try:
                if not data:
                    self._meter_end(flow, call, complete=True)
                elif call.scanner is not None:
                    call.scanner.feed(data)
                elif call.body is not None:
                    if len(call.body) + len(data) <= MAX_JSON_BODY:
                        call.body += data
                    else:
                        call.body = None  # too big to be an LLM answer: charged as partial
            except Exception:
                log.exception("axme-fw: usage reader failed on a chunk")
            return data

        return chunk

    def error(self, flow: http.HTTPFlow) -> None:
        call = flow.metadata.get(META_CALL)
        if call is not None:
            self._meter_end(flow, call, complete=False)
        if flow.client_conn.id in self.lot.awaiting:
            self.lot.step_done(flow.client_conn.id)

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        self.passthrough.add(flow.client_conn.id)

    def client_disconnected(self, client: Client) -> None:
        cid = client.id
        self._closing.discard(cid)
        self.tunnel_auth.pop(cid, None)
        self.tunnel_target.pop(cid, None)
        self.inflight.pop(cid, None)
        self.passthrough.discard(cid)
        agent = self.conn_agent.pop(cid, None)
        if agent is not None:
            conns = self.live.get(agent)
            if conns is not None:
                conns.discard(cid)
                if not conns:
                    del self.live[agent]
        self.lot.forget(cid)

    def _track(self, cid: str, agent: str) -> None:
        if self.conn_agent.get(cid) != agent:
            self.conn_agent[cid] = agent
            self.live.setdefault(agent, set()).add(cid)

    # ------------------------------------------------------------ in-flight work and parking

    def cut(self, agent: str, kill: Kill) -> tuple[int, int]:
        """End every client connection of ``agent`` with work in progress.

        Returns (connections cut, flows ended: requests, streams, websockets, tunnels).
        A request still waiting for its response is first answered with the JSON 403.
        Idle keep-alive connections stay open: their next request is refused with 403.
        """
        flows = 0
        targets = set()
        for cid in self.live.get(agent, ()):
            active = sum(1 for f in self.inflight.get(cid, ()) if _active(f))
            if active or cid in self.passthrough:
                targets.add(cid)
                flows += active or 1  # a passed-through tunnel is one flow
        if not targets:
            return 0, 0

        def answer(cid: str) -> tuple[http.HTTPFlow, http.Response] | None:
            waiting = [
                f for f in self.inflight.get(cid, ()) if f.response is None and f.error is None
            ]
            if len(waiting) != 1 or waiting[0].websocket is not None:
                return None
            headers = {"Connection": "close"}
            return waiting[0], refusal(403, "agent_killed", agent, kill.reason, kill, headers)

        return cut_clients(targets, answer), flows

    def server_connected(self, data: Any) -> None:
        if self.lot.awaiting:
            self.lot.step_done(data.client.id)

    def _park_limits(self) -> tuple[float, int]:
        d = self.rules.defaults
        return d.park_timeout, d.park_max_per_agent

    # ------------------------------------------------------------ limits

    def _admit(self, flow: http.HTTPFlow, d: Decision) -> bool:
        """Count the request against its agent's limits; False when it was refused.

        Check and record are one call on the single-threaded loop, so concurrent
        requests from any number of instances never get more than ``max`` through.
        """
        assert d.agent is not None
        entry = self.specs[d.agent]
        specs = [*entry.requests]
        for action in d.actions:
            specs += entry.actions.get(action, ())
        if not specs:
            return True
        ex = self.windows.admit(d.agent, specs, time.time())
        if ex is None:
            # Action limits (deploys) are rare and costly: make them durable at once.
            self._windows_changed(urgent=len(specs) > len(entry.requests))
            return True
        spec = ex.spec
        detail = limit_detail(ex)
        if self.rules.defaults.mode == "report":
            self._audit(
                "limit.would_exceed", agent=d.agent, rule=f"limits.{spec.key}", detail=detail
            )
            return True
        self._audit_decision(
            flow,
            dataclasses.replace(d, verdict=Verdict.DENY, reason="limit_exceeded", detail=detail),
        )
        self._exceeded(flow, d.agent, ex, detail)
        return False

    def _exceeded(self, flow: http.HTTPFlow, agent: str, ex: Exceeded, detail: str) -> None:
        """Refuse ``flow`` for a limit, then apply the limit's ``on_exceed``."""
        spec = ex.spec
        if spec.on_exceed is OnExceed.THROTTLE:
            retry = retry_after_header(ex.retry_after)
            flow.response = refusal(
                429, "limit_exceeded", agent, detail, extra_headers={"Retry-After": retry}
            )
            self._audit(
                "limit.throttled", agent=agent, rule=f"limits.{spec.key}", retry_after=retry
            )
            return
        flow.response = refusal(403, "limit_exceeded", agent, detail)
        self._auto_kill(agent, "park" if spec.on_exceed is OnExceed.PARK else "block", spec, detail)

    def _meter_end(self, flow: http.HTTPFlow, call: Call, complete: bool) -> None:
        """Settle an LLM call with what its response said; never raises."""
        resp = flow.response
        usage, sent = None, True
        try:
            if resp is not None and resp.status_code >= 400:
                sent = False  # an error answer costs nothing
            else:
                if call.scanner is not None:
                    usage = call.scanner.finish(complete)
                elif resp is not None and complete and call.body is not None:
                    usage = usage_from_json(
                        call.kind,
                        bytes(call.body),
                        call.path_model,
                        resp.headers.get("content-encoding"),
                    )
                # Sent but no usage seen: charged as partial, never silently free.
                sent = resp is not None or flow.server_conn.timestamp_tcp_setup is not None
        except Exception:  # reading failed: still settle (the prompt estimate, partial)
            log.exception("axme-fw: could not read the usage of a call of %s", call.agent)
        try:
            now = time.time()
            self.open_calls.pop(id(call), None)
            result = self.meter.settle(call, usage, sent, now)
            self._windows_changed()
            if result.usage is not None:
                u = result.usage
                self._audit(
                    "llm.usage",
                    agent=call.agent,
                    api=call.kind.value,
                    model=u.model,
                    input=u.input_tokens,
                    output=u.output_tokens,
                    cached_input=u.cached_input_tokens,
                    cache_write=u.cache_write_tokens,
                    usd=round(result.usd, 6),
                    partial=u.partial,
                    unpriced=result.unpriced,
                )
            if result.warn and call.spec is not None:
                self._audit(
                    "budget.warning",
                    agent=call.agent,
                    rule="limits.cost_usd",
                    warn_at=call.spec.warn_at,
                    max=call.spec.max,
                )
                self._alert(
                    "budget.warning",
                    agent=call.agent,
                    reason=f"spend passed {call.spec.warn_at:.0%} of ${call.spec.max:g}",
                )
            crossed = result.crossed
            if (
                crossed is not None
                and crossed.spec.on_exceed is not OnExceed.THROTTLE
                and self.rules.kill_for(call.agent) is None
            ):
                mode = "park" if crossed.spec.on_exceed is OnExceed.PARK else "block"
                self._auto_kill(call.agent, mode, crossed.spec, cost_detail(crossed))
        except Exception:
            log.exception("axme-fw: metering failed for a call of %s", call.agent)

    def _auto_kill(self, agent: str, mode: str, spec: LimitSpec, detail: str) -> None:
        """Kill (or pause) ``agent`` now, in memory, and record it in kill.yaml off the loop.

        Enforced at once by installing the kill into the live ruleset (requests already
        admitted within the limit are not cut); kept as pending until kill.yaml is read back with
        it, so a reload racing the write cannot drop it. ``axme-fw resume`` undoes it.
        """
        kill = Kill(agent, mode, detail, f"policy:limits.{spec.key}", audit_mod.now_iso())  # type: ignore[arg-type]
        self.pending_kills[agent] = (kill, False)
        # What was admitted under the limit goes on; only what comes next is refused.
        self._install(self.rules, spare=agent)
        self._audit(
            "agent.auto_killed",
            agent=agent,
            mode=mode,
            rule=f"limits.{spec.key}",
            reason=detail,
            by=kill.by,
        )
        self._write_auto_kill(kill)

    def _write_auto_kill(self, kill: Kill, attempt: int = 1) -> None:
        """Record an auto-kill in kill.yaml off the loop; retry while it cannot be written
        (e.g. a hand-broken kill.yaml): the kill is enforced in memory meanwhile."""
        assert self.loop is not None and self.loader is not None
        future = self.loop.run_in_executor(
            self.writer,
            killswitch.kill,
            self.loader.directory,
            kill.agent,
            kill.mode,
            kill.reason,
            kill.by,
            kill.at,
        )
        future.add_done_callback(functools.partial(self._auto_kill_written, kill, attempt))

    def _auto_kill_written(
        self, kill: Kill, attempt: int, future: asyncio.Future[killswitch.Change]
    ) -> None:
        try:
            change = future.result()
        except Exception as exc:
            log.error("axme-fw: auto-kill of %s not written to kill.yaml: %s", kill.agent, exc)
            if attempt == 1:
                self._audit("agent.auto_kill_unsaved", agent=kill.agent, error=str(exc))
            if self.loop is not None and kill.agent in self.pending_kills:
                retry = functools.partial(self._write_auto_kill, kill, attempt + 1)
                self.loop.call_later(min(30.0, 0.5 * 2**attempt), retry)
        else:
            if kill.agent in self.pending_kills:
                self.pending_kills[kill.agent] = (kill, True)
            self._audit("kill.written", agent=kill.agent, revision=change.revision)

    def _windows_changed(self, urgent: bool = False) -> None:
        self._windows_dirty = True
        if self.loop is None:
            return
        if urgent and self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self._flush_timer is None:
            delay = 0.0 if urgent else FLUSH_INTERVAL
            self._flush_timer = self.loop.call_later(delay, self._flush_windows)
        self._touch_live()

    def _flush_windows(self) -> None:
        """Hand a snapshot to the writer thread: at most ``FLUSH_INTERVAL`` of counts at risk."""
        self._flush_timer = None
        if not self._windows_dirty or self.store is None or self.loop is None:
            return
        self._windows_dirty = False
        snap = {**self.windows.snapshot(), "saved_at": time.time(), "clean": False}
        self.loop.run_in_executor(self.writer, self.store.save, "windows", snap)
        if self._health_dirty:
            self._health_dirty = False
            health = self.health.snapshot()
            self.loop.run_in_executor(self.writer, self.store.save, "health", health)

    def _usage(self, now: float, only: str | None = None) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for agent in [only] if only is not None else self.windows.agents():
            entry = self.specs.get(agent)
            rows = usage_rows(self.windows, agent, entry.all() if entry else [], now)
            if rows:
                out[agent] = rows
        return out
