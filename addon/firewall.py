"""mitmproxy face: the addon. Hooks turn flows into gate requests and outcomes into answers.

Load it with ``axme-fw run`` or ``mitmdump -s addon/script.py --set axme_rules=rules``.
Where a request goes, in order, is :mod:`axme_fw.gate`; shared state is
:mod:`axme_fw.store`; reloads, kills, publishing and health are :mod:`axme_fw.control`.
This module holds only options, the lifecycle and per-connection bookkeeping.

Failing closed: mitmproxy logs an exception raised in a hook and then *forwards the
flow*. Every hook that decides is wrapped by :func:`_fail_closed`, which turns any
exception into a 403 ``internal_error`` refusal.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions, http, tcp
from mitmproxy.connection import Client

from . import admin, admin_ops, agentapi, background
from . import audit as audit_mod
from .alerts import Alerter
from .answers import refusal
from .connections import Connections, active, decision_record, passes_through, take_headers
from .control import KillEnforcer, Liveness, Publisher, Reloader, load_pricing_file
from .cost import PricingError
from .gate import AutoKill, Do, Effects, Gate, Outcome
from .metering import Metering
from .metrics import Metrics
from .parking import ParkingLot
from .rules import Loader, RulesError
from .ruleset import EMPTY, Ruleset
from .store import LocalStore
from .watch import RulesWatcher

log = logging.getLogger(__name__)


def for_proxy(fw: Firewall, url: str, state_dir: Path, rules_dir: Path) -> LocalStore:
    """The store shared through Redis (imported only with ``--redis``). A URL that cannot
    be one stops the start with one line (OptionsError), the password redacted."""
    from .redis_ops import url_error
    from .redis_store import for_proxy as make

    error = url_error(url)
    if error is not None:
        raise exceptions.OptionsError(f"axme-fw: {error}")

    return make(fw, url, state_dir, rules_dir)


META_AGENT = "axme_fw.agent"
META_LLM = "axme_fw.llm"  # the ApiKind of an LLM call


def _refuse_failed(flow: http.HTTPFlow, hook: str) -> None:
    log.exception("axme-fw: %s failed; refusing the flow", hook)
    try:
        if flow.intercepted:
            flow.resume()
        flow.response = refusal(403, "internal_error", None, "the firewall failed closed")
    except Exception:  # pragma: no cover - last resort
        flow.kill()


def _fail_closed[F: Callable[..., Any]](hook: F) -> F:
    """Refuse the flow if the hook raises: never let mitmproxy forward it. A hook that
    returns a coroutine (it awaits the shared store) is guarded to its end the same way."""

    @functools.wraps(hook)
    def wrapper(self: Firewall, flow: http.HTTPFlow) -> Awaitable[None] | None:
        try:
            pending = hook(self, flow)
        except Exception:
            _refuse_failed(flow, hook.__name__)
            return None
        if pending is None:
            return None

        async def guarded() -> None:
            try:
                await pending
            except Exception:
                _refuse_failed(flow, hook.__name__)

        return guarded()

    return wrapper  # type: ignore[return-value]


def _peer(flow: http.HTTPFlow) -> str | None:
    return flow.client_conn.peername[0] if flow.client_conn.peername else None


class Firewall:
    name = "axme_fw"

    def __init__(self) -> None:
        self.loader: Loader | None = None
        self.state_dir: Path | None = None
        self.audit: audit_mod.AuditWriter | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.watcher: Any = None
        self.conns = Connections()
        self.lot = ParkingLot(self._audit, self._touch, self._park_limits)
        self.admin_listen: admin.Listen | None = admin.parse_listen(admin.DEFAULT_LISTEN)
        self.admin: admin.AdminServer | None = None
        self.alerter: Alerter | None = None
        self.metrics = Metrics(
            lambda name: name in self.rules.agents, lambda: admin_ops.gauges(self)
        )
        self._closing: set[str] = set()  # answered at shutdown, not yet disconnected
        # Set by configure (the state directory), with everything built on them.
        self.store: LocalStore
        self.gate: Gate
        self.kills: KillEnforcer
        self.publisher: Publisher
        self.liveness: Liveness
        self.metering: Metering
        self.reloader: Reloader
        self.file_rules: Ruleset = EMPTY

    @property
    def rules(self) -> Ruleset:
        gate = self.__dict__.get("gate")  # mitmproxy reads every attribute at registration
        return gate.rules if gate is not None else EMPTY

    # ------------------------------------------------------------ lifecycle

    def load(self, loader: Any) -> None:
        loader.add_option("axme_rules", str, "rules", "axme-fw: the rules directory")
        loader.add_option("axme_state", str, "state", "axme-fw: the state directory")
        admin.add_options(loader)
        loader.add_option("axme_redis", str, "", "axme-fw: redis:// URL shared by replicas")
        loader.add_option("axme_replica_id", str, "", "axme-fw: this replica's id")

    def configure(self, updated: set[str]) -> None:
        o = ctx.options
        if "connection_strategy" in updated and o.connection_strategy != "lazy":
            # Eager connects upstream before our hooks run: a refused flow would touch upstream.
            o.update(connection_strategy="lazy")
        if "validate_inbound_headers" in updated and not o.validate_inbound_headers:
            # Request smuggling checks stay on: an egress firewall never trusts framing.
            o.update(validate_inbound_headers=True)
        if updated & admin.OPTIONS:
            self.admin_listen = admin.listen_of(o)
        state = (
            bool(updated & {"axme_state", "axme_redis", "axme_replica_id"}) or not self.state_dir
        )
        if state:
            self._open_state(Path(o.axme_state))
        if "axme_rules" in updated or self.loader is None:
            self.loader = Loader(Path(o.axme_rules))
            self.store.rules_dir = self.loader.directory
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
            self.gate.pricing = loaded
            state = True
        if state:
            assert self.loader is not None
            self.reloader = Reloader(
                self.loader,
                self.gate,
                self._install,
                self.publisher.enforced,
                self._audit,
                self._alert,
            )
            self.reloader.loop = self.loop

    def _open_state(self, state_dir: Path) -> None:
        """The audit log and the store of ``state_dir``, and the objects that use them."""
        self.state_dir = state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        if self.audit is not None:
            self.audit.close()
        self.audit = audit_mod.AuditWriter(state_dir)
        url, rules_dir = ctx.options.axme_redis, Path(ctx.options.axme_rules)
        if "store" in self.__dict__:
            self.store.discard()  # replaced before it served (e.g. --redis set after --state)
        self.store = (
            for_proxy(self, url, state_dir, rules_dir)
            if url
            else LocalStore(state_dir, rules_dir, self._audit)
        )
        self.store.on_change = self._touch
        old = getattr(self, "gate", None)
        self.gate = Gate(self.store)
        if old is not None:
            self.gate.install(old.rules)
            self.gate.pricing, self.gate.admin_targets = old.pricing, old.admin_targets
        live, say = (lambda: list(self.conns.live)), (self._audit, self._alert)
        self.kills = KillEnforcer(self.store, self.conns.cut, live, self.lot, *say)
        self.publisher = Publisher(self.store, self.gate, self._addresses, self.lot.counts)
        self.liveness = Liveness(self.store, self.gate, self._tick, self._audit, self._alert)
        self.metering = Metering(self.gate, self._effects)
        if self.alerter is None:
            self.alerter = Alerter(lambda event, fields: self._audit(event, **fields))

    def running(self) -> None:
        self.loop = self.lot.loop = asyncio.get_running_loop()
        self.store.start(self.loop)
        self.publisher.loop = self.reloader.loop = self.loop
        if self.loader is not None:
            self.watcher = RulesWatcher(self.loader.directory, self.loop, self.reload)
            self.watcher.start()
        admin_ops.start(self)
        self._audit("proxy.started", rules=self.rules.digest, pid=os.getpid())
        self.publisher.enforced()
        self.publisher.touch()  # live.json from the start: status knows a proxy runs
        self.liveness.start(self.loop)

    def _addresses(self) -> tuple[list[str], str | None]:
        """The proxy's listen addresses and the admin listener's, as bound."""
        addrs = []
        try:
            ps = ctx.master.addons.get("proxyserver")
            addrs = [f"{h}:{p}" for h, p, *_ in ps.listen_addrs()]
        except Exception:  # the test harness has no proxyserver
            pass
        listen = self.admin_listen
        bound = f"{listen.host}:{self.admin.port}" if self.admin and listen else None
        return addrs, bound

    async def done(self) -> None:
        log.info(
            "axme-fw: shutting down (%d parked flows answered 503)", sum(self.lot.counts().values())
        )
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
        await background.drain(2.0)  # settlements in flight land before the store closes
        self.store.close()
        self._audit("proxy.stopped", pid=os.getpid())
        if self.alerter is not None:
            self.alerter.close()
        if self.audit is not None:
            self.audit.close()

    # ------------------------------------------------------------ control

    def reload(self, changed: frozenset[str] = frozenset()) -> None:
        self.reloader.reload(changed)

    def _install(self, rules: Ruleset, initial: bool = False, spare: str | None = None) -> None:
        """Swap in ``rules`` (with the store's kills); apply a kill-list change."""
        self.file_rules = rules  # what the files say; the store's kills go on top
        rules = self.kills.merged(rules)
        old = self.gate.rules
        self.gate.install(rules)
        timeout = rules.defaults.park_timeout
        if ctx.options.tcp_timeout < timeout + 60:
            # mitmproxy closes idle connections after tcp_timeout: parked ones included.
            ctx.options.update(tcp_timeout=int(timeout + 60))
        if self.alerter is not None:
            self.alerter.alerts = rules.alerts
        if not initial:
            self.kills.enforce(old, rules, spare)

    def _auto_kill(self, ak: AutoKill) -> None:
        """Enforced at once (what was admitted under the limit goes on)."""
        self.kills.auto_kill(ak)
        self._install(self.file_rules, spare=ak.agent)

    def _audit(self, event: str, **fields: Any) -> None:
        if self.audit is not None:
            self.audit.write(event, **fields)
        self.metrics.event(event, fields)

    def _alert(self, event: str, **fields: Any) -> None:
        if self.alerter is not None:
            self.alerter.send(event, at=audit_mod.now_iso(), **fields)

    def _touch(self) -> None:
        if hasattr(self, "publisher"):
            self.publisher.touch()

    def _tick(self) -> None:
        self.metering.sweep(active)

    def _park_limits(self) -> tuple[float, int]:
        d = self.rules.defaults
        return d.park_timeout, d.park_max_per_agent

    # ------------------------------------------------------------ outcomes

    def _effects(self, fx: Effects, flow: http.HTTPFlow | None = None) -> None:
        for d, would in fx.records:
            assert flow is not None
            if would:
                log.info("axme-fw: would %s %s (%s): %s", d.verdict, d.agent, d.reason, d.detail)
            self._audit("decision", **decision_record(flow, d, would))
        for event, fields in fx.events:
            self._audit(event, **fields)
        for event, fields in fx.alerts:
            self._alert(event, **fields)
        if fx.auto_kill is not None:
            self._auto_kill(fx.auto_kill)

    def _answer(self, flow: http.HTTPFlow, out: Outcome) -> None:
        """Park or refuse ``flow`` as ``out`` says."""
        d = out.decision
        if out.do is Do.PARK:  # a passthrough CONNECT parks the tunnel itself
            assert d.agent is not None
            self.lot.park(flow, d.agent)
        elif out.status == 407:
            flow.response = refusal(407, d.reason, None, d.detail)
        else:
            flow.response = refusal(out.status, d.reason, d.agent, d.detail, d.kill, out.headers)

    # ------------------------------------------------------------ hooks

    @_fail_closed
    def http_connect(self, flow: http.HTTPFlow) -> None:
        auth, _instance, two = take_headers(flow.request)
        t0 = time.perf_counter()
        out = self.gate.connect(self.conns.request(flow, auth, two), passes_through)
        d = out.decision
        self.metrics.request(d.agent, out.do.value, d.reason, time.perf_counter() - t0)
        cid, d, facts = flow.client_conn.id, out.decision, out.facts
        if out.do is not Do.REFUSE:
            if facts.user is not None and facts.token is not None:
                self.conns.tunnel_auth[cid] = (facts.user, facts.token)
            self.conns.tunnel_target[cid] = (facts.host, facts.port)
        if out.do is Do.CONTROL:  # identity only: requests inside are answered by us
            return
        if out.identified and d.agent is not None:
            self.liveness.heartbeat(d.agent, _peer(flow), None)
        self._effects(out.fx, flow)
        if out.do in (Do.OPEN, Do.FORWARD):
            if d.agent is not None:
                self.conns.track(cid, d.agent)
                if out.do is Do.FORWARD:
                    self.conns.passthrough.add(cid)
        else:
            self._answer(flow, out)

    @_fail_closed
    def requestheaders(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        """Decide; for an agent with limits, the store answers step 6 (awaited: the loop
        serves other flows meanwhile)."""
        if flow.response is not None:  # answered by another addon already
            return None
        auth, instance, two = take_headers(flow.request)
        t0 = time.perf_counter()
        out = self.gate.request(self.conns.request(flow, auth, two))
        if out.limits is not None:
            return self._limited(flow, out, instance, t0)
        self._decided(flow, out, instance, t0)
        return None

    async def _limited(
        self, flow: http.HTTPFlow, out: Outcome, instance: str | None, t0: float
    ) -> None:
        await self.gate.limit(out, time.time())
        self._decided(flow, out, instance, t0)

    def _decided(self, flow: http.HTTPFlow, out: Outcome, instance: str | None, t0: float) -> None:
        d = out.decision
        self.metrics.request(d.agent, out.do.value, d.reason, time.perf_counter() - t0)
        if out.path is not None:
            flow.request.path = out.path  # the upstream reads what the rules matched
        if out.host is not None:
            flow.request.host = out.host
        cid = flow.client_conn.id
        if out.do is Do.CONTROL:
            beat = functools.partial(self._beat, flow, instance)
            agentapi.answer(flow, out.facts, self.gate, self.store, beat, self.lot.counts)
            return
        if out.identified and d.agent is not None:
            flow.metadata[META_AGENT] = d.agent
            self.liveness.heartbeat(d.agent, _peer(flow), instance)
        self.conns.passthrough.discard(cid)
        self._effects(out.fx, flow)
        if out.do is not Do.FORWARD:
            self._answer(flow, out)
        elif d.agent is not None:
            self.conns.track(cid, d.agent)
            self.conns.started(cid, flow)
            if out.llm is not None:
                flow.metadata[META_LLM] = out.llm
                # We read usage from the response: ask for it uncompressed.
                flow.request.headers["accept-encoding"] = "identity"

    def _beat(self, flow: http.HTTPFlow, instance: str | None, agent: str) -> str:
        return self.liveness.heartbeat(agent, _peer(flow), instance)

    @_fail_closed
    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        """LLM calls: reserve the worst-case cost before the request is sent."""
        kind = flow.metadata.get(META_LLM)
        agent = flow.metadata.get(META_AGENT)
        if kind is None or agent is None or flow.response is not None:
            return None
        return self._reserve(flow, agent, kind)

    async def _reserve(self, flow: http.HTTPFlow, agent: str, kind: Any) -> None:
        out = await self.metering.begin(flow, agent, kind)
        if out is not None:
            self._effects(out.fx, flow)
            if out.do is not Do.FORWARD:
                self._answer(flow, out)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        self.metering.headers(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self.metering.error(flow)
        if flow.client_conn.id in self.lot.awaiting:
            self.lot.step_done(flow.client_conn.id)

    def tcp_start(self, flow: tcp.TCPFlow) -> None:
        self.conns.passthrough.add(flow.client_conn.id)

    def client_disconnected(self, client: Client) -> None:
        self._closing.discard(client.id)
        self.conns.forget(client.id)
        self.lot.forget(client.id)

    def server_connected(self, data: Any) -> None:
        if self.lot.awaiting:
            self.lot.step_done(data.client.id)
