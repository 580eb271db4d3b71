"""A local fake LLM API speaking the real wire formats (OpenAI, Anthropic, Gemini; JSON and SSE).

Every response reports the fixed usage in :data:`USAGE`, so tests can compute the exact
expected spend. Streams send :data:`EVENTS` events :data:`GAP` seconds apart and record
when the last byte left (``Fake.finished``), so tests can show the proxy never buffers.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# Tokens every call reports: input excludes cache reads/writes where the format does.
USAGE = {"input": 1000, "cached": 200, "cache_write": 100, "output": 1800}
EVENTS = 10
GAP = 0.05


@dataclass
class Fake:
    port: int
    server: ThreadingHTTPServer
    calls: list[dict[str, Any]] = field(default_factory=list)
    finished: dict[str, float] = field(default_factory=dict)  # request id -> last byte sent
    hold: float = 0.0  # seconds to wait before answering (to keep calls in flight)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


def _openai_chat(body: dict[str, Any]) -> dict[str, Any]:
    u = USAGE
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": body.get("model"),
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
        ],
        "usage": {
            "prompt_tokens": u["input"] + u["cached"],
            "completion_tokens": u["output"],
            "total_tokens": u["input"] + u["cached"] + u["output"],
            "prompt_tokens_details": {"cached_tokens": u["cached"]},
        },
    }


def _anthropic(body: dict[str, Any]) -> dict[str, Any]:
    u = USAGE
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": body.get("model"),
        "content": [{"type": "text", "text": "ok"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": u["input"],
            "output_tokens": u["output"],
            "cache_read_input_tokens": u["cached"],
            "cache_creation_input_tokens": u["cache_write"],
        },
    }


def _gemini(model: str) -> dict[str, Any]:
    u = USAGE
    return {
        "candidates": [
            {"content": {"role": "model", "parts": [{"text": "ok"}]}, "finishReason": "STOP"}
        ],
        "modelVersion": model,
        "usageMetadata": {
            "promptTokenCount": u["input"] + u["cached"],
            "cachedContentTokenCount": u["cached"],
            "candidatesTokenCount": u["output"],
            "totalTokenCount": u["input"] + u["cached"] + u["output"],
        },
    }


def _events(path: str, body: dict[str, Any]) -> list[bytes]:
    """The SSE events of a streamed answer, in the real formats."""
    u = USAGE
    model = body.get("model")
    out: list[bytes] = []
    if path.endswith("/chat/completions"):
        for i in range(EVENTS):
            chunk = {
                "id": "c",
                "object": "chat.completion.chunk",
                "model": model,
                "choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}],
            }
            out.append(f"data: {json.dumps(chunk)}\n\n".encode())
        if (body.get("stream_options") or {}).get("include_usage"):
            final = {
                "id": "c",
                "object": "chat.completion.chunk",
                "model": model,
                "choices": [],
                "usage": _openai_chat(body)["usage"],
            }
            out.append(f"data: {json.dumps(final)}\n\n".encode())
        out.append(b"data: [DONE]\n\n")
    elif path.endswith("/v1/messages"):
        start = {
            "type": "message_start",
            "message": {
                **_anthropic(body),
                "content": [],
                "usage": {**_anthropic(body)["usage"], "output_tokens": 1},
            },
        }
        out.append(f"event: message_start\ndata: {json.dumps(start)}\n\n".encode())
        block = {
            "type": "content_block_start",
            "index": 0,
            "content_block": {"type": "text", "text": ""},
        }
        out.append(f"event: content_block_start\ndata: {json.dumps(block)}\n\n".encode())
        for i in range(EVENTS):
            delta = {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": f"t{i} "},
            }
            out.append(f"event: content_block_delta\ndata: {json.dumps(delta)}\n\n".encode())
        out.append(
            b'event: content_block_stop\ndata: {"type": "content_block_stop", "index": 0}\n\n'
        )
        md = {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": u["output"]},
        }
        out.append(f"event: message_delta\ndata: {json.dumps(md)}\n\n".encode())
        out.append(b'event: message_stop\ndata: {"type": "message_stop"}\n\n')
    else:  # Gemini streamGenerateContent?alt=sse
        model_name = path.split("/models/")[1].split(":")[0]
        for i in range(EVENTS):
            part = {
                "candidates": [{"content": {"role": "model", "parts": [{"text": f"t{i} "}]}}],
                "modelVersion": model_name,
            }
            out.append(f"data: {json.dumps(part)}\n\n".encode())
        out.append(f"data: {json.dumps(_gemini(model_name))}\n\n".encode())
    return out


def start(tls: ssl.SSLContext) -> Fake:
    holder: list[Fake] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            fake = holder[0]
            raw = self.rfile.read(int(self.headers.get("content-length") or 0))
            body = json.loads(raw or b"{}")
            path = self.path.split("?", 1)[0]
            rid = self.headers.get("x-test-id") or str(len(fake.calls))
            fake.calls.append(
                {
                    "path": path,
                    "body": body,
                    "id": rid,
                    "accept-encoding": self.headers.get("accept-encoding"),
                }
            )
            if fake.hold:
                time.sleep(fake.hold)
            streamed = body.get("stream") is True or ":streamGenerateContent" in path
            if streamed:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                for event in _events(path, body):
                    self.wfile.write(event)
                    self.wfile.flush()
                    time.sleep(GAP)
                fake.finished[rid] = time.time()
                self.close_connection = True
                return
            if path.endswith("/chat/completions"):
                answer = _openai_chat(body)
            elif path.endswith("/v1/messages"):
                answer = _anthropic(body)
            else:
                answer = _gemini(path.split("/models/")[1].split(":")[0])
            data = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 256

    server = Server(("127.0.0.1", 0), Handler)
    server.socket = tls.wrap_socket(server.socket, server_side=True)
    fake = Fake(int(server.server_address[1]), server)
    holder.append(fake)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return fake
