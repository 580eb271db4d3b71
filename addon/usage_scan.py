"""Pure core: usage read from LLM response bodies, whole (`usage_from_json`) or streamed.

A `StreamScanner` reads a streamed response (SSE, or Gemini's piecewise JSON array) as
it passes, in bounded memory. Bodies may be gzip- or deflate-encoded. What each API
reports and how it maps onto `Usage` is described in `usage.py`. No mitmproxy, no I/O.
"""

from __future__ import annotations

import json
import logging
import re
import zlib
from collections.abc import Callable, Mapping
from dataclasses import replace

from .usage import GEMINI, ApiKind, Usage, as_dict, as_str, to_usage

logger = logging.getLogger(__name__)

MAX_LINE = 1 << 20  # an SSE line longer than this is dropped, not buffered
MAX_JSON = 4 << 20  # a streamed JSON body is kept whole up to this size ...
_JSON_HEAD = 16 << 10  # ... and past it only its head (for the model) ...
_JSON_TAIL = 256 << 10  # ... and its tail (for the last usage object)
_JSON_TRIES = 8  # usage objects tried, from the end, in a cut JSON body
_JSON_WINDOW = 64 << 10  # bytes after a usage key that may hold its object
_PIECE = 256 << 10  # decompress at most this much at a time (bounds a gzip bomb)


def _decode(body: bytes, content_encoding: str | None) -> bytes | None:
    enc = (content_encoding or "").strip().lower()
    if enc in ("", "identity"):
        return body
    if enc not in ("gzip", "x-gzip", "deflate"):
        return None
    try:
        dec = _decompressor(enc, body)
        out = dec.decompress(body, MAX_JSON * 4)
    except zlib.error:
        return None
    return None if dec.unconsumed_tail else out


def _decompressor(enc: str, first: bytes) -> zlib._Decompress:
    if enc != "deflate":
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    # "deflate" is zlib-wrapped by the RFC, raw by some servers: 0x78 starts a zlib header.
    return zlib.decompressobj(zlib.MAX_WBITS if first[:1] == b"\x78" else -zlib.MAX_WBITS)


def usage_from_json(
    kind: ApiKind,
    body: bytes,
    path_model: str | None = None,
    content_encoding: str | None = None,
) -> Usage | None:
    """Usage from a whole (non-streamed) response body, or None when it reports none.

    `content_encoding` may be None/identity, gzip or deflate; any other encoding, a body
    that is not JSON, or one without a usage object gives None. Never raises on bad input.
    A Gemini stream body (a JSON array) uses its last element that carries usage; a body
    that is SSE after all is run through a `StreamScanner`.
    """
    raw = _decode(body, content_encoding)
    if raw is None:
        return None
    head = raw.lstrip()[:6]
    if head[:1] not in (b"{", b"["):
        if not (head.startswith((b"data:", b"event:", b":"))):
            return None
        scanner = StreamScanner(kind, path_model=path_model)
        scanner.feed(raw)
        return scanner.finish(True)
    try:
        doc: object = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if kind in GEMINI:
        parts = doc if isinstance(doc, list) else [doc]
        for part in reversed(parts):
            p = as_dict(part)
            if isinstance(p.get("usageMetadata"), dict):
                model = as_str(p.get("modelVersion")) or path_model
                return to_usage(kind, as_dict(p["usageMetadata"]), model)
        return None
    obj = as_dict(doc)
    u = obj.get("usage")
    if not isinstance(u, dict):
        return None
    return to_usage(kind, u, as_str(obj.get("model")) or path_model)


_USAGE_OBJ = re.compile(rb'"usage"\s*:\s*\{')
_MODEL_STR = re.compile(rb'"(?:model|modelVersion)"\s*:\s*"([^"\\]{1,200})"')
_COLON = re.compile(r"\s*:\s*")
_RESP_FINAL = (b'"response.completed"', b'"response.incomplete"', b'"response.failed"')
_RESP_START = (b'"response.created"', b'"response.in_progress"')


class StreamScanner:
    """Reads usage from one streamed response as it passes, without buffering the stream.

    Feed it every chunk of the body as received (`feed`), then call `finish` once.
    SSE lines may end in LF or CRLF and chunks may split anything anywhere. Each `data:`
    line is handled on its own (these APIs never split JSON across data lines), and only
    lines that can carry usage or the model are JSON-parsed; the rest are counted with a
    substring test. A body that starts with `{` or `[` is taken as JSON (Gemini without
    `alt=sse`, or an error) and kept whole up to `MAX_JSON` bytes, past which only its
    head and tail are kept. Memory is bounded by `MAX_LINE`, `MAX_JSON` and the chunk size.

    `feed` never raises: what cannot be read is counted in `unparseable`. An unsupported
    content encoding (anything but gzip and deflate) makes the scanner give up (None).
    """

    __slots__ = (
        "_buf",
        "_dec",
        "_deltas",
        "_discarding",
        "_enc",
        "_final",
        "_head",
        "_kind",
        "_mode",
        "_model",
        "_on_data",
        "_overflow",
        "_path_model",
        "_u",
        "broken",
        "unparseable",
    )

    def __init__(
        self, kind: ApiKind, content_encoding: str | None = None, path_model: str | None = None
    ) -> None:
        self._kind = kind
        self._path_model = path_model
        self._model: str | None = None
        self._u: Usage | None = None  # the latest usage seen, final or not
        self._final = False  # a final usage report was seen
        self._deltas = 0  # output events seen: the fallback output count
        self._buf = bytearray()  # SSE: the partial last line; JSON: the body (or its tail)
        self._head = b""  # JSON past MAX_JSON: the first _JSON_HEAD bytes
        self._overflow = False
        self._discarding = False  # inside an SSE line longer than MAX_LINE
        self._mode = ""  # "" until the first non-blank byte, then "sse" or "json"
        self.unparseable = 0
        self.broken = False
        self._dec: zlib._Decompress | None = None  # made on the first chunk, from _enc
        enc = self._enc = (content_encoding or "").strip().lower()
        if enc not in ("", "identity", "gzip", "x-gzip", "deflate"):
            logger.debug("cannot scan a %s-encoded stream", enc)
            self.broken = True
        handlers: dict[ApiKind, Callable[[bytes], None]] = {
            ApiKind.OPENAI_CHAT: self._chat,
            ApiKind.OPENAI_EMBEDDINGS: self._chat,
            ApiKind.OPENAI_RESPONSES: self._responses,
            ApiKind.ANTHROPIC_MESSAGES: self._anthropic,
            ApiKind.GEMINI_GENERATE: self._gemini,
            ApiKind.GEMINI_STREAM: self._gemini,
        }
        self._on_data = handlers[kind]

    def feed(self, chunk: bytes) -> None:
        """Scan the next chunk of the body. Never raises."""
        if self.broken or not chunk:
            return
        try:
            if self._enc in ("", "identity"):
                self._scan(chunk)
                return
            if self._dec is None:
                self._dec = _decompressor(self._enc, chunk)
            out = self._dec.decompress(chunk, _PIECE)
            self._scan(out)
            while self._dec.unconsumed_tail:
                self._scan(self._dec.decompress(self._dec.unconsumed_tail, _PIECE))
        except zlib.error:
            logger.debug("undecodable compressed stream; usage scanning stops")
            self.unparseable += 1
            self.broken = True
        except Exception:  # garbage must never break the proxy's stream
            logger.debug("unscannable chunk", exc_info=True)
            self.unparseable += 1

    def finish(self, complete: bool) -> Usage | None:
        """The usage of the whole stream; call once, after the last chunk.

        `complete` is False when the stream was cut; a trailing line without its newline
        is then dropped as truncated. Returns the final usage if it was reported (then
        `partial` is False even if the stream was cut after it), else what was known so
        far with `partial=True` and output at least the number of output events seen,
        else None when nothing recognisable was seen.
        """
        try:
            if not self.broken and self._dec is not None:
                self._scan(self._dec.flush())
            if self._mode == "json":
                return self._finish_json()
            if complete and self._buf and not self._discarding:
                self._line(bytes(self._buf))
        except Exception:
            logger.debug("unscannable stream end", exc_info=True)
            self.unparseable += 1
        self._buf.clear()
        u, model = self._u, self._model or self._path_model
        if u is not None and self._final:
            return u if u.model else replace(u, model=model)
        if u is None and model is None and self._deltas == 0:
            return None
        u = u or Usage(model, 0, 0)
        out = max(u.output_tokens, self._deltas)
        return replace(u, model=u.model or model, output_tokens=out, partial=True)

    # -- framing --------------------------------------------------------------------

    def _scan(self, data: bytes) -> None:
        if not data:
            return
        if not self._mode:
            stripped = data.lstrip()
            if not stripped:
                return
            self._mode = "json" if stripped[:1] in (b"{", b"[") else "sse"
        if self._mode == "json":
            self._keep_json(data)
            return
        if self._discarding:
            i = data.find(b"\n")
            if i < 0:
                return
            self._discarding = False
            data = data[i + 1 :]
        nl = data.rfind(b"\n")
        if nl < 0:
            self._buffer(data)
            return
        if self._buf:
            self._buf += data[:nl]
            block = bytes(self._buf)
            self._buf.clear()
        else:
            block = data[:nl]
        for line in block.split(b"\n"):
            self._line(line)
        self._buffer(data[nl + 1 :])

    def _buffer(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) > MAX_LINE:
            self._buf.clear()
            self._discarding = True
            self.unparseable += 1

    def _line(self, line: bytes) -> None:
        if line.startswith(b"data:"):
            payload = line[5:].strip()
            if payload and payload != b"[DONE]":
                self._on_data(payload)

    def _load(self, payload: bytes) -> Mapping[str, object]:
        try:
            doc: object = json.loads(payload)
        except (ValueError, RecursionError):
            self.unparseable += 1
            return {}
        if not isinstance(doc, dict):
            self.unparseable += 1
            return {}
        return doc

    # -- per API: each gets one `data:` payload --------------------------------------

    def _chat(self, p: bytes) -> None:
        # Parse only the chunk that carries a usage object (every chunk has `"usage":null`
        # when include_usage is set) and, until the model is known, chunks naming it.
        if _USAGE_OBJ.search(p):
            obj = self._load(p)
            self._model = self._model or as_str(obj.get("model"))
            u = obj.get("usage")
            if isinstance(u, dict):
                self._u = to_usage(self._kind, u, self._model or self._path_model)
                self._final = True
        elif self._model is None and b'"model"' in p:
            self._model = as_str(self._load(p).get("model"))
        if b'"delta"' in p:
            self._deltas += 1

    def _responses(self, p: bytes) -> None:
        if any(t in p for t in _RESP_FINAL):
            resp = as_dict(self._load(p).get("response"))
            self._model = as_str(resp.get("model")) or self._model
            u = resp.get("usage")
            if isinstance(u, dict):
                self._u = to_usage(self._kind, u, self._model or self._path_model)
                self._final = True
        elif self._model is None and any(t in p for t in _RESP_START):
            self._model = as_str(as_dict(self._load(p).get("response")).get("model"))
        elif b'.delta"' in p:
            self._deltas += 1

    def _anthropic(self, p: bytes) -> None:
        if b'"usage"' not in p:
            if b'"content_block_delta"' in p:
                self._deltas += 1
            return
        obj = self._load(p)
        kind = obj.get("type")
        if kind == "message_start":
            msg = as_dict(obj.get("message"))
            self._model = as_str(msg.get("model")) or self._model
            self._u = to_usage(
                self._kind, as_dict(msg.get("usage")), self._model or self._path_model
            )
        elif kind == "message_delta":
            # Cumulative counts; input fields appear only when they changed.
            new = {k: v for k, v in as_dict(obj.get("usage")).items() if isinstance(v, int)}
            old = self._u or Usage(self._model or self._path_model, 0, 0)
            merged = {**_anthropic_fields(old), **new}
            self._u = to_usage(self._kind, merged, old.model)
            self._final = True

    def _gemini(self, p: bytes) -> None:
        # Every event is a whole response; most carry running usage, the last the final.
        if b'"candidates"' in p:
            self._deltas += 1
        if b'"usageMetadata"' not in p:
            return
        obj = self._load(p)
        self._model = as_str(obj.get("modelVersion")) or self._model
        u = obj.get("usageMetadata")
        if isinstance(u, dict):
            self._u = to_usage(self._kind, u, self._model or self._path_model)
            self._final = b'"finishReason"' in p

    # -- JSON bodies (Gemini without alt=sse) --------------------------------------------

    def _keep_json(self, data: bytes) -> None:
        self._buf += data
        if not self._overflow and len(self._buf) > MAX_JSON:
            self._overflow = True
            self._head = bytes(self._buf[:_JSON_HEAD])
        if self._overflow and len(self._buf) > 2 * _JSON_TAIL:
            del self._buf[:-_JSON_TAIL]

    def _finish_json(self) -> Usage | None:
        body = bytes(self._buf)
        self._buf.clear()
        if not self._overflow:
            u = usage_from_json(self._kind, body, self._path_model)
            if u is not None:
                return u
        # Cut or too big to keep: the last whole usage object in what was kept. A usage
        # object is small, so look at a few candidates, each through a bounded window.
        key = b'"usageMetadata"' if self._kind in GEMINI else b'"usage"'
        end = len(body)
        for _ in range(_JSON_TRIES):
            pos = body.rfind(key, 0, end)
            if pos < 0:
                break
            end = pos
            text = body[pos + len(key) : pos + _JSON_WINDOW].decode("utf-8", "replace")
            colon = _COLON.match(text)
            try:
                found, _ = json.JSONDecoder().raw_decode(text, colon.end() if colon else 0)
            except (ValueError, RecursionError):
                continue
            if isinstance(found, dict):
                models = _MODEL_STR.findall(self._head + body)
                model = models[-1].decode("utf-8", "replace") if models else self._path_model
                return replace(to_usage(self._kind, found, model), partial=True)
        self.unparseable += 1
        return None


def _anthropic_fields(u: Usage) -> dict[str, object]:
    return {
        "input_tokens": u.input_tokens,
        "output_tokens": u.output_tokens,
        "cache_read_input_tokens": u.cached_input_tokens,
        "cache_creation_input_tokens": u.cache_write_tokens,
    }
