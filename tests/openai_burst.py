"""Chat completions with the real openai SDK, configured only by proxy environment variables.

    python tests/openai_burst.py BASE_URL MODEL PREFIX N seq
    python tests/openai_burst.py BASE_URL MODEL PREFIX N burst READY_FILE GO_FILE

``seq``: N calls one after the other. ``burst``: build the client, create READY_FILE,
wait (60 s at most) until GO_FILE exists, then make N calls at once from N threads
(one barrier), so calls from several such processes overlap. The SDK never retries
(``max_retries=0``): every call the test counts is one request. Prints one JSON line per
call: ``{"id": "PREFIX-i", "status": 200}`` or the status, error and decision header of a
refusal.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

import openai


def main() -> None:
    base, model, prefix, n, mode = sys.argv[1:6]
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="sk-test", max_retries=0, timeout=30)
    count = int(n)
    results: list[dict[str, Any]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(count)

    def one(i: int, wait: bool) -> None:
        rid = f"{prefix}-{i}"
        if wait:
            barrier.wait(30)
        out: dict[str, Any] = {"id": rid}
        try:
            client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "deploy it"}],
                max_tokens=2000,
                extra_headers={"x-test-id": rid},
            )
            out["status"] = 200
        except openai.APIStatusError as exc:
            out["status"] = exc.status_code
            out["decision"] = exc.response.headers.get("X-Axme-Fw-Decision")
            try:
                out["error"] = exc.response.json().get("error")
            except ValueError:
                out["error"] = exc.response.text[:200]
        except openai.APIConnectionError as exc:
            out.update(status=0, error=repr(exc))
        with lock:
            results.append(out)

    if mode == "seq":
        for i in range(count):
            one(i, wait=False)
    else:
        ready, go = sys.argv[6], sys.argv[7]
        open(ready, "w").close()  # an empty marker file
        deadline = time.monotonic() + 60
        while not os.path.exists(go) and time.monotonic() < deadline:
            time.sleep(0.002)
        threads = [threading.Thread(target=one, args=(i, True)) for i in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
