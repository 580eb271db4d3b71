"""Pure core: who is calling the admin API: bearer tokens → operators, and a brake on guessing.

Tokens are never stored: rules hold their SHA-256 (``operators.NAME.token_sha256``). A
presented token is hashed once and compared with every operator's digest in constant
time (``hmac.compare_digest``), all of them, so the time taken says nothing about
which name or how many characters matched.

:class:`Brake` slows guessing: after ``MAX_FAILURES`` failed attempts from one address
within ``WINDOW`` seconds, that address gets 429 (with ``Retry-After``) until its oldest
failure leaves the window, even with a right token.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import deque
from collections.abc import Mapping

from .ruleset import Operator

MAX_FAILURES = 5
WINDOW = 60.0
MAX_ADDRESSES = 10_000  # addresses remembered; beyond, the oldest are forgotten


def bearer(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header, or None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def authenticate(operators: Mapping[str, Operator], token: str | None) -> Operator | None:
    """The operator whose token this is, or None. Constant time in the token."""
    if not token:
        return None
    digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest().encode()
    found = None
    for op in operators.values():
        if hmac.compare_digest(digest, op.token_sha256.encode()):
            found = op
    return found


class Brake:
    """Failed authentications per address in a sliding window."""

    def __init__(self, max_failures: int = MAX_FAILURES, window: float = WINDOW) -> None:
        self.max_failures, self.window = max_failures, window
        self._failed: dict[str, deque[float]] = {}

    def retry_after(self, address: str, now: float) -> float:
        """Seconds until ``address`` may try again (0: it may now)."""
        times = self._failed.get(address)
        if times is None:
            return 0.0
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failed[address]
            return 0.0
        if len(times) < self.max_failures:
            return 0.0
        return max(0.001, times[0] + self.window - now)

    def failed(self, address: str, now: float) -> int:
        """Record a failure; returns how many are in the window now."""
        times = self._failed.pop(address, None) or deque()
        times.append(now)
        self._failed[address] = times  # most recent last: the oldest are dropped first
        while len(self._failed) > MAX_ADDRESSES:
            del self._failed[next(iter(self._failed))]
        return len(times)
