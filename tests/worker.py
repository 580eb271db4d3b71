"""A client process for e2e tests: GETs a URL in a loop through the proxy from the environment.

    python tests/worker.py OUT.jsonl URL STOPFILE [MAX_SECONDS]

Writes one JSON line per request: start/end wall-clock times, status, decision
header. Stops when STOPFILE exists, after MAX_SECONDS, or after 20,000 requests.
"""

from __future__ import annotations

import json
import os
import sys
import time

import requests


def main() -> None:
    out, url, stopfile = sys.argv[1], sys.argv[2], sys.argv[3]
    limit = float(sys.argv[4]) if len(sys.argv) > 4 else 30.0
    session = requests.Session()  # keep-alive: the kill must reach open connections
    deadline = time.monotonic() + limit
    with open(out, "w", buffering=1) as fh:
        for _ in range(20_000):
            if os.path.exists(stopfile) or time.monotonic() > deadline:
                break
            t0 = time.time()
            try:
                r = session.get(url, timeout=10)
                rec = {
                    "t0": t0,
                    "t1": time.time(),
                    "status": r.status_code,
                    "decision": r.headers.get("X-Axme-Fw-Decision"),
                    "pid": os.getpid(),
                }
                if r.status_code == 403:
                    rec["body"] = r.json()
            except requests.RequestException as exc:
                rec = {
                    "t0": t0,
                    "t1": time.time(),
                    "status": 0,
                    "error": repr(exc),
                    "pid": os.getpid(),
                }
            fh.write(json.dumps(rec) + "\n")
            time.sleep(0.002)  # a busy agent, not a load generator


if __name__ == "__main__":
    main()
