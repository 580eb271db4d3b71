"""mitmproxy face: ending work in progress: answering a request stuck upstream, cutting it.

mitmproxy has no public API for this (``flow.kill()`` does not stop a flow in transit,
mitmproxy #4711). What works, checked on 12.3 and covered by e2e tests: cancel the
connection handler's task, as mitmproxy's own idle timeout does. Keep the mitmproxy pin
tight.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from typing import Any

from mitmproxy import ctx, http

log = logging.getLogger(__name__)


def cut_clients(
    targets: Collection[str], answer: Callable[[str], tuple[http.HTTPFlow, http.Response] | None]
) -> int:
    """Cancel every client connection whose id is in ``targets``; returns how many.

    ``answer(client_id)`` may name one HTTP/1 request on that connection still waiting
    for its response, with what to answer it before the cut.
    """
    proxyserver = ctx.master.addons.get("proxyserver")
    cut = 0
    for handler in list(getattr(proxyserver, "connections", {}).values()):
        cid = handler.client.id
        if cid not in targets:
            continue
        io = handler.transports.get(handler.client)
        if io is None or io.handler is None:
            continue
        pending = answer(cid)
        if pending is not None:
            write_to_client(handler, *pending)
        io.handler.cancel("axme-fw: agent killed")
        cut += 1
    return cut


def write_to_client(handler: Any, flow: http.HTTPFlow, response: http.Response) -> None:
    """Answer an HTTP/1 request that is waiting on upstream, before its connection is cut.

    mitmproxy has no public way to answer a flow already sent upstream. For HTTP/1 the
    answer is plain bytes on the client connection: written as is, or through the
    client-side TLS session for an intercepted tunnel. Internal API (checked against
    mitmproxy 12.3 and covered by an e2e test); when anything is off, the caller still
    cuts the connection, so the fallback is a closed connection, never a forwarded flow.
    """
    from mitmproxy.net.http.http1 import assemble_response
    from mitmproxy.proxy.layers.tls import ClientTLSLayer

    if not flow.request.http_version.startswith("HTTP/1"):
        return
    try:
        writer = handler.transports[handler.client].writer
        data = assemble_response(response)
        if not flow.client_conn.tls:
            writer.write(data)
            return
        layer = find_layer(
            handler.layer, lambda x: isinstance(x, ClientTLSLayer) and x.conn is handler.client
        )
        if layer is None or layer.tls is None:
            return
        layer.tls.sendall(data)
        out = bytearray()
        while True:
            try:
                chunk = layer.tls.bio_read(65535)
            except Exception:  # SSL.WantReadError: nothing more buffered
                break
            if not chunk:
                break
            out.extend(chunk)
        writer.write(bytes(out))
    except Exception:
        log.warning("axme-fw: could not answer an in-flight flow before cutting it", exc_info=True)


def find_layer(root: Any, match: Callable[[Any], bool]) -> Any:
    """Search mitmproxy's layer tree (NextLayer.layer, child_layer, HttpLayer streams)."""
    todo, seen = [root], set()
    while todo:
        layer = todo.pop()
        if layer is None or id(layer) in seen:
            continue
        seen.add(id(layer))
        if match(layer):
            return layer
        todo += [getattr(layer, "layer", None), getattr(layer, "child_layer", None)]
        todo += list(getattr(layer, "streams", {}).values())
        # Some layers (modes.HttpProxy) keep their child only as a bound handler.
        for name in ("_handle_event", "_handle"):
            todo.append(getattr(getattr(layer, name, None), "__self__", None))
    return None
