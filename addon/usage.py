"""Pure core: token usage from LLM API traffic: which API a request is, and what it consumed.

No mitmproxy, no I/O. Here: the API kinds, `Usage`, each API's usage object mapped onto
it, and the pre-send `Estimate`. Reading usage out of response bodies, whole or
streamed, is `usage_scan.py`. `cost.py` re-exports both and adds prices.

Where each API reports usage, and how it maps onto `Usage` (input excludes cache hits):

- OpenAI chat completions (`openai.chat`): `usage.prompt_tokens` *includes*
  `usage.prompt_tokens_details.cached_tokens`, so input = prompt - cached,
  cached_input = cached, output = `completion_tokens` (reasoning included). Streamed,
  usage arrives only in the last chunk, and only when the request set
  `stream_options.include_usage`.
- OpenAI responses (`openai.responses`): `usage.input_tokens` includes
  `usage.input_tokens_details.cached_tokens`; output = `output_tokens`. Streamed, the
  final usage is in `response.completed` (or `response.incomplete` / `response.failed`).
- OpenAI embeddings (`openai.embeddings`): `usage.prompt_tokens`, no output.
- Anthropic messages (`anthropic.messages`): `usage.input_tokens` *excludes* the cache;
  `cache_read_input_tokens` and `cache_creation_input_tokens` are separate. Streamed,
  `message_start` carries the model and input usage, `message_delta` the cumulative
  `output_tokens` (and any input fields that changed).
- Gemini (`gemini.generate`, `gemini.stream`): `usageMetadata.promptTokenCount`
  (+ `toolUsePromptTokenCount`) *includes* `cachedContentTokenCount`; output =
  `candidatesTokenCount + thoughtsTokenCount`. The model is in the path and usually in
  `modelVersion`. Streamed as SSE with `alt=sse` (every event a full response, the last
  with the final usage) or, without it, as one JSON array written piece by piece.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

DEFAULT_MAX_OUTPUT = 4096


class ApiKind(StrEnum):
    OPENAI_CHAT = "openai.chat"
    OPENAI_RESPONSES = "openai.responses"
    OPENAI_EMBEDDINGS = "openai.embeddings"
    ANTHROPIC_MESSAGES = "anthropic.messages"
    GEMINI_GENERATE = "gemini.generate"
    GEMINI_STREAM = "gemini.stream"


GEMINI = (ApiKind.GEMINI_GENERATE, ApiKind.GEMINI_STREAM)
_GEMINI_PATH = re.compile(r"/models/([^/:]+):(generateContent|streamGenerateContent)$")
_SUFFIXES = (
    ("/chat/completions", ApiKind.OPENAI_CHAT),
    ("/responses", ApiKind.OPENAI_RESPONSES),
    ("/embeddings", ApiKind.OPENAI_EMBEDDINGS),
    ("/v1/messages", ApiKind.ANTHROPIC_MESSAGES),
)


def detect_api(method: str, path: str) -> ApiKind | None:
    """Which LLM API a request calls, by method and path alone (any host).

    Only POST counts. The query string and a trailing slash are ignored, so
    `/v1/chat/completions`, Azure's `/openai/deployments/D/chat/completions?api-version=V`
    and OpenRouter's `/api/v1/chat/completions` are all `openai.chat`.
    `/v1/messages/count_tokens` and `/v1/messages/batches` are not messages calls.
    """
    if method.upper() != "POST":
        return None
    p = path.split("?", 1)[0].split("#", 1)[0].rstrip("/")
    for suffix, kind in _SUFFIXES:
        if p.endswith(suffix):
            return kind
    m = _GEMINI_PATH.search(p)
    if m is None:
        return None
    return ApiKind.GEMINI_STREAM if m[2] == "streamGenerateContent" else ApiKind.GEMINI_GENERATE


def path_model(path: str) -> str | None:
    """The model named in a Gemini path (`.../models/gemini-2.5-flash:generateContent`)."""
    m = _GEMINI_PATH.search(path.split("?", 1)[0].rstrip("/"))
    return m[1] if m else None


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens one call consumed. `input_tokens` excludes cache reads and cache writes.

    `partial` is True when no final usage report was seen (a cut stream, or a stream that
    never reports usage): the counts are what was known, output possibly approximated.
    """

    model: str | None
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    partial: bool = False


@dataclass(frozen=True, slots=True)
class Estimate:
    """What a request may cost, judged before it is sent.

    `include_usage` says whether the response will report usage: False only for a
    streamed chat completion without `stream_options.include_usage`, whose prompt the
    caller must then charge from `input_tokens_est`.
    """

    model: str | None
    input_tokens_est: int
    max_output_tokens: int
    stream: bool
    include_usage: bool


def _int(x: object) -> int:
    if isinstance(x, bool) or not isinstance(x, int | float) or x != x or x <= 0:
        return 0
    return int(min(x, 1 << 53))


def as_dict(x: object) -> Mapping[str, object]:
    return x if isinstance(x, dict) else {}


def as_str(x: object) -> str | None:
    return x if isinstance(x, str) and x else None


def to_usage(kind: ApiKind, u: Mapping[str, object], model: str | None) -> Usage:
    """Map one API's usage object onto `Usage` (see the module docstring)."""
    if kind in (ApiKind.OPENAI_CHAT, ApiKind.OPENAI_EMBEDDINGS):
        total = _int(u.get("prompt_tokens"))
        cached = _int(as_dict(u.get("prompt_tokens_details")).get("cached_tokens"))
        out = _int(u.get("completion_tokens"))
    elif kind is ApiKind.OPENAI_RESPONSES:
        total = _int(u.get("input_tokens"))
        cached = _int(as_dict(u.get("input_tokens_details")).get("cached_tokens"))
        out = _int(u.get("output_tokens"))
    elif kind is ApiKind.ANTHROPIC_MESSAGES:
        return Usage(
            model,
            _int(u.get("input_tokens")),
            _int(u.get("output_tokens")),
            _int(u.get("cache_read_input_tokens")),
            _int(u.get("cache_creation_input_tokens")),
        )
    else:
        total = _int(u.get("promptTokenCount")) + _int(u.get("toolUsePromptTokenCount"))
        cached = _int(u.get("cachedContentTokenCount"))
        out = _int(u.get("candidatesTokenCount")) + _int(u.get("thoughtsTokenCount"))
    cached = min(cached, total)
    return Usage(model, total - cached, out, cached)


def request_estimate(kind: ApiKind, body: bytes, path_model: str | None = None) -> Estimate:
    """A pre-send estimate from the request body; never raises.

    input_tokens_est is len(body)/4 rounded up (about 4 bytes per token of JSON).
    max_output_tokens: chat `max_completion_tokens` or `max_tokens`; responses
    `max_output_tokens`; messages `max_tokens`; Gemini `generationConfig.maxOutputTokens`;
    0 for embeddings; DEFAULT_MAX_OUTPUT (4096) when absent. Gemini streams by path,
    the others by `"stream": true`.
    """
    try:
        obj = as_dict(json.loads(body))
    except (ValueError, RecursionError):
        obj = {}
    model = as_str(obj.get("model")) or path_model
    est = (len(body) + 3) // 4
    if kind in GEMINI:
        cfg = as_dict(obj.get("generationConfig") or obj.get("generation_config"))
        out = _int(cfg.get("maxOutputTokens") or cfg.get("max_output_tokens"))
        return Estimate(model, est, out or DEFAULT_MAX_OUTPUT, kind is ApiKind.GEMINI_STREAM, True)
    if kind is ApiKind.OPENAI_EMBEDDINGS:
        return Estimate(model, est, 0, False, True)
    keys = {
        ApiKind.OPENAI_CHAT: ("max_completion_tokens", "max_tokens"),
        ApiKind.OPENAI_RESPONSES: ("max_output_tokens",),
    }.get(kind, ("max_tokens",))
    out = next((n for k in keys if (n := _int(obj.get(k)))), 0)
    stream = obj.get("stream") is True
    include = not stream or kind is not ApiKind.OPENAI_CHAT
    if not include:
        include = as_dict(obj.get("stream_options")).get("include_usage") is True
    return Estimate(model, est, out or DEFAULT_MAX_OUTPUT, stream, include)
