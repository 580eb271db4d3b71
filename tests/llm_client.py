"""A real LLM client process, configured only by proxy environment variables.

    python tests/llm_client.py KIND BASE_URL MODEL [TEST_ID]

KIND: openai | openai-stream | anthropic | anthropic-stream | gemini | gemini-stream.
Prints one JSON object: {"status": 200, "first": t, "events": n} or the API error.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import anthropic
import httpx
import openai

MESSAGES: Any = [{"role": "user", "content": "deploy it"}]


def main() -> None:
    kind, base, model = sys.argv[1], sys.argv[2], sys.argv[3]
    test_id = sys.argv[4] if len(sys.argv) > 4 else "x"
    headers = {"x-test-id": test_id}
    out: dict[str, object] = {"status": 200}
    times: list[float] = []
    try:
        if kind.startswith("openai"):
            oc = openai.OpenAI(base_url=f"{base}/v1", api_key="sk-test", max_retries=0)
            if kind == "openai":
                oc.chat.completions.create(
                    model=model,
                    messages=MESSAGES,
                    max_tokens=2000,
                    extra_headers=headers,
                )
            else:
                stream = oc.chat.completions.create(
                    model=model,
                    messages=MESSAGES,
                    max_tokens=2000,
                    stream=True,
                    extra_headers=headers,
                )
                for _ in stream:
                    times.append(time.time())
        elif kind.startswith("anthropic"):
            ac = anthropic.Anthropic(base_url=base, api_key="sk-ant-test", max_retries=0)
            if kind == "anthropic":
                ac.messages.create(
                    model=model,
                    max_tokens=2000,
                    messages=MESSAGES,
                    extra_headers=headers,
                )
            else:
                with ac.messages.stream(
                    model=model,
                    max_tokens=2000,
                    messages=MESSAGES,
                    extra_headers=headers,
                ) as s:
                    for _ in s.text_stream:
                        times.append(time.time())
        else:
            body = {
                "contents": [{"role": "user", "parts": [{"text": "deploy it"}]}],
                "generationConfig": {"maxOutputTokens": 2000},
            }
            with httpx.Client(timeout=30) as hc:  # proxy and CA from the environment
                if kind == "gemini":
                    r = hc.post(
                        f"{base}/v1beta/models/{model}:generateContent?key=AIzaSECRET",
                        json=body,
                        headers=headers,
                    )
                    out["status"] = r.status_code
                    if r.status_code != 200:
                        out["body"] = r.json()
                else:
                    url = (
                        f"{base}/v1beta/models/{model}:streamGenerateContent?alt=sse&key=AIzaSECRET"
                    )
                    with hc.stream("POST", url, json=body, headers=headers) as r:
                        out["status"] = r.status_code
                        for line in r.iter_lines():
                            if line.startswith("data:"):
                                times.append(time.time())
    except (openai.APIStatusError, anthropic.APIStatusError) as exc:
        out = {"status": exc.status_code, "body": exc.response.json()}
    except (openai.APIConnectionError, anthropic.APIConnectionError, httpx.HTTPError) as exc:
        out = {"status": 0, "error": repr(exc)}
    if times:
        out["first"], out["events"] = times[0], len(times)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
