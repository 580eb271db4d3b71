"""Shared rig: paths, run sizes, clocks, waiting and statistics for every section."""

from __future__ import annotations

import asyncio
import base64
import bisect
import contextlib
import ctypes
import hashlib
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin" if (ROOT / ".venv" / "bin").is_dir() else Path(sys.executable).parent
RESULTS_JSON = ROOT / "bench" / "results.json"
RESULTS_MD = ROOT / "docs" / "benchmarks.md"
HOST = "127.0.0.1"
MS = 1e6  # nanoseconds per millisecond


@dataclass(frozen=True)
class Sizes:
    """Counts and durations; ``--quick`` shrinks all of them."""

    rounds: int  # interleaved throughput rounds per proxy
    seconds: float  # one throughput run
    conns: int  # client connections for throughput
    agents: int  # agents in the main firewall's rules
    actions: int
    sse_trials: int
    kills: int  # per kill method
    park_flows: int
    decide_calls: int  # per timing sample
    decide_samples: int
    big_agents: int  # the "10,000 agents" size
    reload_trials: int
    budget: float  # seconds for the whole run; sections stop early past it


FULL = Sizes(
    rounds=6,
    seconds=3.0,
    conns=8,
    agents=1000,
    actions=100,
    sse_trials=12,
    kills=50,
    park_flows=5000,
    decide_calls=20000,
    decide_samples=7,
    big_agents=10000,
    reload_trials=5,
    budget=540.0,
)
QUICK = replace(
    FULL,
    rounds=2,
    seconds=1.0,
    sse_trials=3,
    kills=8,
    park_flows=200,
    decide_calls=5000,
    decide_samples=3,
    reload_trials=1,
    budget=50.0,
)


def now_ns() -> int:
    """CLOCK_MONOTONIC in ns: the same clock in every process on Linux."""
    return time.monotonic_ns()


def pct(values: Sequence[float], p: float) -> float:
    """The p-th percentile (nearest rank) of ``values``; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def free_port() -> int:
    """A free loopback port, found by binding port 0."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def basic_auth(user: str, token: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{token}".encode()).decode()


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB (0 when unreadable)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def lis_length(seq: Sequence[int]) -> int:
    """Length of the longest increasing subsequence (patience sorting)."""
    tails: list[int] = []
    for x in seq:
        i = bisect.bisect_left(tails, x)
        if i == len(tails):
            tails.append(x)
        else:
            tails[i] = x
    return len(tails)


def _child_setup() -> None:
    """In each child: die with the benchmark (PR_SET_PDEATHSIG = SIGTERM)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def passed(self) -> bool:
        return time.monotonic() >= self.end


async def wait_until(
    check: Callable[[], bool], timeout: float, what: str, step: float = 0.005
) -> None:
    """Poll ``check`` until true; raise TimeoutError naming ``what`` after ``timeout`` s."""
    deadline = Deadline(timeout)
    while not check():
        if deadline.passed():
            raise TimeoutError(f"timed out after {timeout:.1f} s waiting for {what}")
        await asyncio.sleep(step)


async def timed[T](coro: Awaitable[T]) -> tuple[T, int]:
    """``coro``'s result and the monotonic time (ns) at which it completed."""
    result = await coro
    return result, now_ns()


def ratio(a: float | None, b: float | None) -> float | None:
    """``b / a``; None when either is missing, NaN, or ``a`` is 0."""
    if a is None or b is None or a == 0 or a != a or b != b:
        return None
    return b / a
