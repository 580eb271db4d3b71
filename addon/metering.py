"""mitmproxy face: LLM calls on the wire: reserve before sending, read usage as it passes.

The request body is known in the ``request`` hook: the gate reserves the call's worst
case then. Every LLM response is streamed through a callable (never buffered, JSON
included): it passes each chunk on unchanged and at once, feeds the usage reader, and
settles on the final empty chunk, so no ``response`` hook runs on the per-request
path. A call whose flow ends unseen is settled by :meth:`Metering.sweep`. Settling is a
task on the loop (the store may be shared): its effects, an auto-kill included, apply
when the store has answered.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from mitmproxy import http

from .background import spawn
from .cost import ApiKind, StreamScanner, Usage, usage_from_json
from .gate import Effects, Gate, Outcome
from .meter import Call

log = logging.getLogger(__name__)

META_CALL = "axme_fw.call"  # the flow's meter.Call, once reserved
MAX_JSON_BODY = 8 << 20  # an LLM JSON answer larger than this is not read for usage


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


class Metering:
    def __init__(self, gate: Gate, effects: Callable[[Effects], None]) -> None:
        self.gate = gate
        self._effects = effects
        # LLM calls reserved and not yet settled, swept in case a flow ends unseen.
        self.open_calls: dict[int, tuple[http.HTTPFlow, Call]] = {}

    async def begin(self, flow: http.HTTPFlow, agent: str, kind: ApiKind) -> Outcome | None:
        """Reserve the call; the refusal outcome when it may not go."""
        body = flow.request.get_content(strict=False) or b""
        got = await self.gate.reserve(agent, kind, flow.request.path, body, time.time())
        if isinstance(got, Outcome):
            return got
        flow.metadata[META_CALL] = got
        self.open_calls[id(got)] = (flow, got)
        if kind is ApiKind.OPENAI_CHAT and got.estimate.stream and not got.estimate.include_usage:
            # Streamed chat completions report usage only when asked to: ask (documented).
            patched = with_include_usage(body)
            if patched is not None:
                flow.request.set_content(patched)
        return None

    def headers(self, flow: http.HTTPFlow) -> None:
        """Stream SSE at once; read LLM responses as they pass. A failure here settles
        the call at once (charged its prompt estimate): a reservation is never left open."""
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
                resp.stream = self._reader(flow, call)
            elif sse:
                resp.stream = True  # never buffer a stream: pass each chunk on at once
        except Exception:  # streaming and metering must never break the flow
            log.exception("axme-fw: responseheaders failed")
            if call is not None:
                self.end(flow, call, complete=False)

    def _reader(self, flow: http.HTTPFlow, call: Call) -> Callable[[bytes], bytes]:
        """A ``response.stream`` callable. Never raises (a raise here would stall the
        client connection)."""

        def chunk(data: bytes) -> bytes:
            try:
                if not data:
                    self.end(flow, call, complete=True)
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
            self.end(flow, call, complete=False)

    def sweep(self, active: Callable[[http.HTTPFlow], bool]) -> None:
        for flow, call in list(self.open_calls.values()):
            if not active(flow):  # ended without our reader seeing the end
                self.end(flow, call, complete=flow.error is None)

    def end(self, flow: http.HTTPFlow, call: Call, complete: bool) -> None:
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
        self.open_calls.pop(id(call), None)
        spawn(self._settle(call, usage, sent, time.time()), f"settling a call of {call.agent}")

    async def _settle(self, call: Call, usage: Usage | None, sent: bool, now: float) -> None:
        self._effects(await self.gate.settle(call, usage, sent, now))
