"""Usage parsing (JSON and SSE, every API), request estimates, prices and the pricing file."""

from __future__ import annotations

import gzip
import json
import math
import random
import zlib
from pathlib import Path

import pytest

from axme_fw.cost import (
    ApiKind,
    Estimate,
    Price,
    Pricing,
    PricingError,
    StreamScanner,
    Usage,
    detect_api,
    load_pricing,
    path_model,
    request_estimate,
    usage_from_json,
)
from axme_fw.usage_scan import MAX_LINE

FIXTURES = Path(__file__).parent / "fixtures" / "llm"
REPO = Path(__file__).parent.parent

K = ApiKind


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def scan(kind: ApiKind, body: bytes, size: int, complete: bool = True, **kw: str) -> Usage | None:
    scanner = StreamScanner(kind, **kw)
    for i in range(0, len(body), size):
        scanner.feed(body[i : i + size])
    return scanner.finish(complete)


# -- which API --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "kind"),
    [
        ("POST", "/v1/chat/completions", K.OPENAI_CHAT),
        ("post", "/v1/chat/completions/", K.OPENAI_CHAT),
        ("POST", "/chat/completions", K.OPENAI_CHAT),
        (
            "POST",
            "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21",
            K.OPENAI_CHAT,
        ),
        ("POST", "/api/v1/chat/completions", K.OPENAI_CHAT),
        ("POST", "/v1/responses", K.OPENAI_RESPONSES),
        ("POST", "/openai/v1/responses?api-version=preview", K.OPENAI_RESPONSES),
        ("POST", "/v1/embeddings", K.OPENAI_EMBEDDINGS),
        ("POST", "/v1/messages", K.ANTHROPIC_MESSAGES),
        ("POST", "/v1/messages?beta=true", K.ANTHROPIC_MESSAGES),
        ("POST", "/v1beta/models/gemini-2.5-flash:generateContent", K.GEMINI_GENERATE),
        ("POST", "/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse", K.GEMINI_STREAM),
        (
            "POST",
            "/v1/projects/p1/locations/us-central1/publishers/google/models/"
            "gemini-2.0-flash:streamGenerateContent",
            K.GEMINI_STREAM,
        ),
        ("GET", "/v1/chat/completions", None),
        ("GET", "/v1/models", None),
        ("POST", "/v1/messages/count_tokens", None),
        ("POST", "/v1/messages/batches", None),
        ("POST", "/v1/responses/resp_123/cancel", None),
        ("POST", "/v1/completions", None),
        ("POST", "/v1beta/models/gemini-2.5-flash:countTokens", None),
        ("POST", "/upload?next=/v1/chat/completions", None),
    ],
)
def test_detect_api(method: str, path: str, kind: ApiKind | None) -> None:
    assert detect_api(method, path) == kind


@pytest.mark.parametrize(
    ("path", "model"),
    [
        ("/v1beta/models/gemini-2.5-flash:generateContent", "gemini-2.5-flash"),
        ("/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse&key=k", "gemini-2.5-pro"),
        ("/v1/chat/completions", None),
    ],
)
def test_path_model(path: str, model: str | None) -> None:
    assert path_model(path) == model


# -- whole bodies -----------------------------------------------------------------------

JSON_CASES = [
    # prompt 2006 includes 1920 cached
    ("openai_chat.json", K.OPENAI_CHAT, None, Usage("gpt-4o-2024-08-06", 86, 8, 1920)),
    # input 1536 includes 1024 cached
    (
        "openai_responses.json",
        K.OPENAI_RESPONSES,
        None,
        Usage("gpt-4.1-2025-04-14", 512, 117, 1024),
    ),
    ("openai_embeddings.json", K.OPENAI_EMBEDDINGS, None, Usage("text-embedding-3-small", 8, 0)),
    # Anthropic input excludes the cache
    (
        "anthropic_messages.json",
        K.ANTHROPIC_MESSAGES,
        None,
        Usage("claude-sonnet-4-5-20250929", 21, 393, 14209, 1888),
    ),
    # prompt 1280 includes 1024 cached; output = 52 candidates + 388 thoughts
    (
        "gemini_generate.json",
        K.GEMINI_GENERATE,
        "gemini-x",
        Usage("gemini-2.5-flash", 256, 440, 1024),
    ),
    # a non-SSE stream body: the last element of the array
    (
        "gemini_stream_array.json",
        K.GEMINI_STREAM,
        None,
        Usage("gemini-2.5-flash-lite", 102, 23, 2048),
    ),
]


@pytest.mark.parametrize(("name", "kind", "pmodel", "expected"), JSON_CASES)
def test_usage_from_json(name: str, kind: ApiKind, pmodel: str | None, expected: Usage) -> None:
    body = fixture(name)
    assert usage_from_json(kind, body, pmodel) == expected
    assert usage_from_json(kind, gzip.compress(body), pmodel, content_encoding="gzip") == expected
    assert (
        usage_from_json(kind, zlib.compress(body), pmodel, content_encoding="deflate") == expected
    )
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    deflated = raw.compress(body) + raw.flush()
    assert usage_from_json(kind, deflated, pmodel, content_encoding="Deflate") == expected


def test_usage_from_json_takes_the_model_from_the_path_when_the_body_has_none() -> None:
    body = json.dumps({"usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": 3}})
    got = usage_from_json(K.GEMINI_GENERATE, body.encode(), "gemini-2.0-flash")
    assert got == Usage("gemini-2.0-flash", 10, 3)


def test_usage_from_json_reads_an_sse_body() -> None:
    got = usage_from_json(K.ANTHROPIC_MESSAGES, fixture("anthropic_messages_stream.sse"))
    assert got == Usage("claude-haiku-4-5-20251001", 472, 89, 2048, 0)


@pytest.mark.parametrize(
    ("body", "encoding"),
    [
        (b'{"error": {"message": "Rate limit reached", "type": "requests"}}', None),
        (b'{"usage": null}', None),
        (b"[1, 2, 3]", None),
        (b"<html>502 Bad Gateway</html>", None),
        (b"", None),
        (b"[" * 100_000, None),
        (b"\x1f\x8b\x08\x00garbage", "gzip"),
        (gzip.compress(b'{"usage": {"prompt_tokens": 1}}'), "br"),
    ],
)
def test_usage_from_json_without_usage_is_none(body: bytes, encoding: str | None) -> None:
    for kind in ApiKind:
        assert usage_from_json(kind, body, content_encoding=encoding) is None


# -- streams ----------------------------------------------------------------------------

STREAM_CASES = [
    ("openai_chat_stream.sse", K.OPENAI_CHAT, Usage("gpt-4o-mini-2024-07-18", 19, 10)),
    # no include_usage: output approximated by the 11 chunks with a delta, prompt unknown
    (
        "openai_chat_stream_nousage.sse",
        K.OPENAI_CHAT,
        Usage("gpt-4o-mini-2024-07-18", 0, 11, partial=True),
    ),
    ("openai_responses_stream.sse", K.OPENAI_RESPONSES, Usage("o4-mini-2025-04-16", 37, 210)),
    (
        "anthropic_messages_stream.sse",
        K.ANTHROPIC_MESSAGES,
        Usage("claude-haiku-4-5-20251001", 472, 89, 2048, 0),
    ),
    # CRLF lines; output = 41 candidates + 612 thoughts
    ("gemini_stream.sse", K.GEMINI_STREAM, Usage("gemini-2.5-pro", 9, 653)),
    ("gemini_stream_array.json", K.GEMINI_STREAM, Usage("gemini-2.5-flash-lite", 102, 23, 2048)),
]


@pytest.mark.parametrize("size", [1 << 20, 7, 1])
@pytest.mark.parametrize(("name", "kind", "expected"), STREAM_CASES)
def test_stream(name: str, kind: ApiKind, expected: Usage, size: int) -> None:
    """Whole, in 7-byte chunks, and byte by byte: every split gives the same answer."""
    assert scan(kind, fixture(name), size) == expected


@pytest.mark.parametrize(("name", "kind", "expected"), STREAM_CASES)
@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_stream_compressed(name: str, kind: ApiKind, expected: Usage, encoding: str) -> None:
    body = fixture(name)
    packed = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
    assert scan(kind, packed, 5, content_encoding=encoding) == expected


def test_stream_with_lf_lines_when_the_fixture_has_crlf() -> None:
    body = fixture("gemini_stream.sse")
    assert b"\r\n" in body
    assert scan(K.GEMINI_STREAM, body.replace(b"\r\n", b"\n"), 3) == Usage("gemini-2.5-pro", 9, 653)


CUT_CASES = [
    # cut inside the usage chunk: the deltas seen so far
    (
        "openai_chat_stream.sse",
        K.OPENAI_CHAT,
        b'"choices":[]',
        Usage("gpt-4o-mini-2024-07-18", 0, 11, partial=True),
    ),
    (
        "openai_chat_stream_nousage.sse",
        K.OPENAI_CHAT,
        b'" today"',
        Usage("gpt-4o-mini-2024-07-18", 0, 8, partial=True),
    ),
    (
        "openai_responses_stream.sse",
        K.OPENAI_RESPONSES,
        b'"type":"response.completed"',
        Usage("o4-mini-2025-04-16", 0, 10, partial=True),
    ),
    # input from message_start, output from the 6 text deltas
    (
        "anthropic_messages_stream.sse",
        K.ANTHROPIC_MESSAGES,
        b'"type":"message_delta"',
        Usage("claude-haiku-4-5-20251001", 472, 6, 2048, 0, partial=True),
    ),
    # the second event's running count: 22 candidates + 612 thoughts
    (
        "gemini_stream.sse",
        K.GEMINI_STREAM,
        b"more strongly",
        Usage("gemini-2.5-pro", 9, 634, partial=True),
    ),
    (
        "gemini_stream_array.json",
        K.GEMINI_STREAM,
        b"potatoes thinly",
        Usage("gemini-2.5-flash-lite", 102, 17, 2048, partial=True),
    ),
    # cut after the last usage but before the closing bracket
    (
        "gemini_stream_array.json",
        K.GEMINI_STREAM,
        b'"nE4aaLLXEsyAz7IPm6aL-Ao"\r\n}\r\n]',
        Usage("gemini-2.5-flash-lite", 102, 23, 2048, partial=True),
    ),
]


@pytest.mark.parametrize(("name", "kind", "marker", "expected"), CUT_CASES)
@pytest.mark.parametrize("size", [1 << 20, 1])
def test_cut_stream_is_partial(
    name: str, kind: ApiKind, marker: bytes, expected: Usage, size: int
) -> None:
    body = fixture(name)
    cut = body.rindex(marker)
    assert scan(kind, body[:cut], size, complete=False) == expected


@pytest.mark.parametrize(
    ("name", "kind", "marker"),
    [
        ("anthropic_messages_stream.sse", K.ANTHROPIC_MESSAGES, b"event: message_stop"),
        ("openai_chat_stream.sse", K.OPENAI_CHAT, b"data: [DONE]"),
    ],
)
def test_cut_after_the_final_usage_is_not_partial(name: str, kind: ApiKind, marker: bytes) -> None:
    body = fixture(name)
    got = scan(kind, body[: body.index(marker)], 64, complete=False)
    assert got is not None
    assert not got.partial
    assert got == scan(kind, body, 64)


def test_anthropic_message_delta_may_update_input_counts() -> None:
    body = fixture("anthropic_messages_stream.sse").replace(
        b'"usage":{"output_tokens":89}',
        b'"usage":{"input_tokens":500,"cache_read_input_tokens":null,"output_tokens":89}',
    )
    assert scan(K.ANTHROPIC_MESSAGES, body, 64) == Usage(
        "claude-haiku-4-5-20251001", 500, 89, 2048, 0
    )


def test_stream_model_falls_back_to_the_path() -> None:
    body = b'data: {"usageMetadata": {"promptTokenCount": 4}}\n\n'
    got = scan(K.GEMINI_STREAM, body, 8, path_model="gemini-2.0-flash")
    assert got == Usage("gemini-2.0-flash", 4, 0, partial=True)


def test_empty_stream_is_none() -> None:
    for kind in ApiKind:
        assert scan(kind, b"", 1) is None
        assert scan(kind, b": keep-alive\n\n", 1, complete=False) is None


def test_unsupported_encoding_gives_up() -> None:
    body = fixture("openai_chat_stream.sse")
    scanner = StreamScanner(K.OPENAI_CHAT, content_encoding="br")
    scanner.feed(body)
    assert scanner.broken
    assert scanner.finish(True) is None


def test_a_line_past_the_cap_is_dropped_and_memory_stays_bounded() -> None:
    tail = fixture("openai_chat_stream.sse")
    scanner = StreamScanner(K.OPENAI_CHAT)
    chunk = 64 << 10
    scanner.feed(b"data: ")
    for _ in range(MAX_LINE // chunk + 3):
        scanner.feed(b"x" * chunk)
        assert len(scanner._buf) <= MAX_LINE
    scanner.feed(b"\n\n" + tail)
    assert scanner.unparseable == 1
    assert scanner.finish(True) == Usage("gpt-4o-mini-2024-07-18", 19, 10)


def test_unparseable_lines_are_counted() -> None:
    scanner = StreamScanner(K.OPENAI_CHAT)
    scanner.feed(b'data: {"usage":{"prompt_tokens": oops}\n\ndata: [1, "usage"]\n')
    scanner.feed(b'data: {"usage":{"prompt_tokens":3}}\n\n')
    assert scanner.unparseable == 1
    assert scanner.finish(True) == Usage(None, 3, 0)


GARBAGE = [
    b"\x00\xff\xfe" * 1000,
    b"data: {\n\ndata: }\n\n",
    b"data: " + b"[" * 200_000 + b"\n",
    b'data: {"usage":' * 50_000 + b"\n",
    b'data: 5\ndata: null\ndata: []\ndata: "usage"\n',
    b'data: {"usage": 7, "usageMetadata": [], "type": "message_start", "message": 5}\n',
    b'data: {"type":"message_delta","usage":{"output_tokens":"many"}}\n',
    b'data: {"usage": {"prompt_tokens": "lots", "completion_tokens": -5, "input_tokens": 1e400}}\n',
    b'data: {"type":"response.completed","response":{"usage":[1]}}\n',
    b'{"usage": {"prompt_tokens": 1',
    b"[" + b'{"usageMetadata": ' * 30_000,
    b'["usageMetadata": {]',
    random.Random(6).randbytes(50_000),
    b"\r\n" * 5000,
]


@pytest.mark.parametrize("garbage", GARBAGE, ids=range(len(GARBAGE)))
@pytest.mark.parametrize("kind", list(ApiKind))
def test_garbage_never_raises(garbage: bytes, kind: ApiKind) -> None:
    for complete in (True, False):
        for size in (len(garbage) or 1, 3):
            got = scan(kind, garbage, size, complete=complete)
            assert got is None or isinstance(got, Usage)
    scanner = StreamScanner(kind, content_encoding="gzip")
    scanner.feed(garbage)
    assert scanner.finish(True) is None
    got = usage_from_json(kind, garbage)
    assert got is None or isinstance(got, Usage)
    request_estimate(kind, garbage)


# -- request estimates ------------------------------------------------------------------


def _req(obj: object) -> bytes:
    return json.dumps(obj).encode()


MSGS = [{"role": "user", "content": "Summarise the attached incident report in five bullets."}]
ESTIMATE_CASES = [
    (
        K.OPENAI_CHAT,
        _req(
            {
                "model": "gpt-4o",
                "messages": MSGS,
                "max_completion_tokens": 500,
                "max_tokens": 9,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        ),
        None,
        ("gpt-4o", 500, True, True),
    ),
    (
        K.OPENAI_CHAT,
        _req({"model": "gpt-4o-mini", "messages": MSGS, "max_tokens": 300, "stream": True}),
        None,
        ("gpt-4o-mini", 300, True, False),
    ),
    (
        K.OPENAI_CHAT,
        _req({"model": "gpt-4.1", "messages": MSGS}),
        None,
        ("gpt-4.1", 4096, False, True),
    ),
    (
        K.OPENAI_RESPONSES,
        _req({"model": "o3", "input": "hi", "max_output_tokens": 1000, "stream": True}),
        None,
        ("o3", 1000, True, True),
    ),
    (
        K.ANTHROPIC_MESSAGES,
        _req({"model": "claude-sonnet-4-5", "max_tokens": 1024, "messages": MSGS}),
        None,
        ("claude-sonnet-4-5", 1024, False, True),
    ),
    (
        K.GEMINI_STREAM,
        _req(
            {
                "contents": [{"parts": [{"text": "hi"}]}],
                "generationConfig": {"maxOutputTokens": 256},
            }
        ),
        "gemini-2.5-flash",
        ("gemini-2.5-flash", 256, True, True),
    ),
    (
        K.GEMINI_GENERATE,
        _req({"contents": [{"parts": [{"text": "hi"}]}]}),
        "gemini-2.5-pro",
        ("gemini-2.5-pro", 4096, False, True),
    ),
    (
        K.OPENAI_EMBEDDINGS,
        _req({"model": "text-embedding-3-small", "input": ["a", "b"]}),
        None,
        ("text-embedding-3-small", 0, False, True),
    ),
    (K.OPENAI_CHAT, b"\xff not json", None, (None, 4096, False, True)),
]


@pytest.mark.parametrize(("kind", "body", "pmodel", "expected"), ESTIMATE_CASES)
def test_request_estimate(
    kind: ApiKind, body: bytes, pmodel: str | None, expected: tuple[str | None, int, bool, bool]
) -> None:
    model, max_out, stream, include = expected
    est = Estimate(model, math.ceil(len(body) / 4), max_out, stream, include)
    assert request_estimate(kind, body, pmodel) == est


# -- prices -----------------------------------------------------------------------------

PRICING = Pricing(
    {
        "gpt-4o": Price(2.50, 10.00, 1.25, 2.50),
        "gpt-4o-mini": Price(0.15, 0.60, 0.075, 0.15),
        "gpt-5": Price(1.25, 10.00, 0.125, 1.25),
        "claude-sonnet-4-5": Price(3.00, 15.00, 0.30, 3.75),
        "claude-opus-4": Price(15.00, 75.00, 1.50, 18.75),
        "claude-opus-4-5": Price(5.00, 25.00, 0.50, 6.25),
        "gemini-2.5-flash": Price(0.30, 2.50, 0.03, 0.30),
        "openai/gpt-4o": Price(3.00, 12.00, 1.50, 3.00),
    },
    "deny",
    "2026-11-01",
)


@pytest.mark.parametrize(
    ("model", "key"),
    [
        ("gpt-4o", "gpt-4o"),
        ("GPT-4o", "gpt-4o"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-mini", "gpt-4o-mini"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-5-2025-08-07", "gpt-5"),
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("claude-sonnet-4-5@20250929", "claude-sonnet-4-5"),
        ("claude-opus-4-5-20251101", "claude-opus-4-5"),
        ("claude-opus-4-20250514", "claude-opus-4"),
        ("models/gemini-2.5-flash", "gemini-2.5-flash"),
        ("gemini-2.5-flash-preview-05-20", "gemini-2.5-flash"),
        ("openai/gpt-4o", "openai/gpt-4o"),
        ("gpt-5.2", None),
        ("gpt-4oo", None),
        ("gpt", None),
        ("llama-3.1-70b", None),
        ("", None),
        (None, None),
    ],
)
def test_price_for(model: str | None, key: str | None) -> None:
    assert PRICING.price_for(model) == (PRICING.prices[key] if key else None)


@pytest.mark.parametrize(
    ("usage", "usd"),
    [
        (Usage("gpt-4o-2024-08-06", 1_000_000, 100_000, 0), 3.50),
        # input + cache reads + output: 0.24 + 2.40 + 0.08
        (Usage("gpt-4o", 96_000, 8_000, 1_920_000), 2.72),
        # 3.00 input + 3.00 output + 0.90 cache reads + 1.50 cache writes
        (Usage("claude-sonnet-4-5-20250929", 1_000_000, 200_000, 3_000_000, 400_000), 8.40),
        (Usage("gemini-2.5-flash", 2_000_000, 1_000_000, 10_000_000), 3.40),
        (Usage("gpt-4o-mini", 0, 0), 0.0),
    ],
)
def test_cost_usd(usage: Usage, usd: float) -> None:
    cost = PRICING.cost_usd(usage)
    assert cost is not None
    assert round(cost, 2) == usd


def test_cost_of_one_call_to_the_micro_dollar() -> None:
    usage = usage_from_json(K.OPENAI_CHAT, fixture("openai_chat.json"))
    assert usage is not None
    cost = PRICING.cost_usd(usage)
    assert cost is not None
    assert round(cost * 1_000_000) == 86 * 2.5 + 1920 * 1.25 + 8 * 10  # 2695 micro-dollars


def test_unpriced_cost_is_none() -> None:
    assert PRICING.cost_usd(Usage("llama-3.1-70b", 1000, 1000)) is None
    assert PRICING.cost_usd(Usage(None, 1000, 1000)) is None


def test_shipped_pricing_covers_the_common_models() -> None:
    pricing = load_pricing(REPO / "rules" / "pricing.yaml")
    assert pricing.unpriced == "deny"
    for model in [
        "gpt-4o-2024-08-06",
        "gpt-4o-mini-2024-07-18",
        "gpt-4.1-2025-04-14",
        "gpt-4.1-mini",
        "gpt-4.1-nano",
        "o3-2025-04-16",
        "o4-mini-2025-04-16",
        "gpt-5-2025-08-07",
        "gpt-5-mini",
        "gpt-5-nano",
        "text-embedding-3-small",
        "text-embedding-3-large",
        "claude-opus-4-1-20250805",
        "claude-sonnet-4-5-20250929",
        "claude-sonnet-4-20250514",
        "claude-haiku-4-5-20251001",
        "claude-3-7-sonnet-20250219",
        "claude-3-5-sonnet-20241022",
        "claude-3-5-haiku-20241022",
        "gemini-2.5-pro",
        "gemini-2.5-flash",
        "gemini-2.5-flash-lite",
        "gemini-2.0-flash-001",
    ]:
        assert pricing.price_for(model) is not None, model
    for name, price in pricing.prices.items():
        if name.startswith("claude-") and name != "claude-3-haiku":  # 3 Haiku: 0.03 / 0.30
            assert price.cached_input == pytest.approx(price.input * 0.1), name
            assert price.cache_write == pytest.approx(price.input * 1.25), name


def test_pricing_defaults(tmp_path: Path) -> None:
    path = tmp_path / "pricing.yaml"
    path.write_text("version: 1\nas_of: 2026-11-01\nmodels:\n  m: {input: 2, output: 4}\n")
    pricing = load_pricing(path)
    assert pricing == Pricing({"m": Price(2.0, 4.0, 2.0, 2.0)}, "deny", "2026-11-01")


HEAD = 'version: 1\nas_of: "2026-11-01"\nunpriced: allow\nmodels:\n'
PRICING_ERRORS = [
    ("", "1: top level: empty file"),
    ("- 1\n", "1: top level: expected a mapping"),
    (
        "version: 1\nas_of: 2026-11-01\nmodels: {}\ncurrency: EUR\n",
        "4: currency: unknown key (expected as_of, models, unpriced, version)",
    ),
    ('version: 1\nas_of: "2026-11-01"\n', "1: models: missing required key"),
    ('version: 2\nas_of: "2026-11-01"\nmodels: {}\n', "1: version: unsupported version 2 (use 1)"),
    (
        "version: 1\nas_of: soon\nmodels: {}\n",
        "2: as_of: expected a date like 2026-11-01, got 'soon'",
    ),
    (
        'version: 1\nas_of: "2026-11-01"\nunpriced: maybe\nmodels: {}\n',
        "3: unpriced: expected allow or deny, got 'maybe'",
    ),
    (
        'version: 1\nas_of: "2026-11-01"\nmodels: [gpt-4o]\n',
        "3: models: expected a mapping of model names to prices",
    ),
    (HEAD + "  gpt-4o: 2.5\n", "5: models.gpt-4o: expected a mapping"),
    (
        HEAD + "  gpt-4o: {input: 1, output: 2}\n  o3: {input: 1, output: 2, cachedinput: 1}\n",
        "6: models.o3.cachedinput: unknown key (expected cache_write, cached_input, input, output)",
    ),
    (
        HEAD + "  gpt-4o: {input: cheap, output: 2}\n",
        "5: models.gpt-4o.input: expected a number, got 'cheap'",
    ),
    (
        HEAD + "  gpt-4o: {input: yes, output: 2}\n",
        "5: models.gpt-4o.input: expected a number, got True",
    ),
    (
        HEAD + "  gpt-4o: {input: [1], output: 2}\n",
        "5: models.gpt-4o.input: expected a number, got a list",
    ),
    (
        HEAD + "  gpt-4o: {input: 1, output: -1}\n",
        "5: models.gpt-4o.output: bad price -1 (use >= 0)",
    ),
    (
        HEAD + "  gpt-4o:\n    input: 1\n    output: .nan\n",
        "7: models.gpt-4o.output: bad price nan (use >= 0)",
    ),
    (HEAD + "  gpt-4o: {input: 1}\n", "5: models.gpt-4o.output: missing required key"),
    (
        HEAD + "  gpt-4o: {input: 1, output: 2}\n  GPT-4o: {input: 1, output: 2}\n",
        "6: models.gpt-4o: defined twice",
    ),
    (HEAD + "  gpt-4o: {input: 1, input: 2, output: 2}\n", "5: models.gpt-4o.input: defined twice"),
    (HEAD + "  42: {input: 1, output: 2}\n", "5: models.42: model name must be a string"),
    (
        HEAD + "  gpt-4o: {input: 1, output: 2\n",
        "6: YAML syntax error: expected ',' or '}', but got '<stream end>'",
    ),
]


@pytest.mark.parametrize(("text", "message"), PRICING_ERRORS)
def test_pricing_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "pricing.yaml"
    path.write_text(text)
    with pytest.raises(PricingError) as exc:
        load_pricing(path)
    assert str(exc.value) == f"{path}:{message}"


def test_pricing_file_missing(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(PricingError) as exc:
        load_pricing(path)
    assert str(exc.value) == f"{path}: cannot read: No such file or directory"
