"""Fire N requests at once through the proxy from the environment (one connection each).

    python tests/park_worker.py OUT.jsonl URL_PREFIX N [TIMEOUT] [METHOD]

Request i goes to URL_PREFIX-i (or URL_PREFIX with "{i}" replaced by i).
Writes one JSON line per finished request.
All N threads wait on one barrier, so the requests leave as close together as possible.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import requests


def main() -> None:
    out, prefix, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    timeout = float(sys.argv[4]) if len(sys.argv) > 4 else 60.0
    method = sys.argv[5] if len(sys.argv) > 5 else "GET"
    barrier = threading.Barrier(n)
    lock = threading.Lock()
    fh = open(out, "w", buffering=1)  # noqa: SIM115 - closed below, after the threads

    def one(i: int) -> None:
        url = prefix.replace("{i}", str(i)) if "{i}" in prefix else f"{prefix}-{i}"
        barrier.wait()
        try:
            r = requests.request(method, url, timeout=timeout, headers={"Connection": "close"})
            rec = {
                "url": url,
                "status": r.status_code,
                "t": time.time(),
                "decision": r.headers.get("X-Axme-Fw-Decision"),
            }
        except requests.RequestException as exc:
            rec = {"url": url, "status": 0, "error": type(exc).__name__, "t": time.time()}
        with lock:
            fh.write(json.dumps(rec) + "\n")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    fh.close()


if __name__ == "__main__":
    main()
