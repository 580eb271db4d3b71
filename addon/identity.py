"""Pure core: who is calling: proxy credentials → (agent, token); the instance from the client.

Pure. The token is checked against the rules in :func:`axme_fw.policy.identify`.
"""

from __future__ import annotations

import base64
import binascii

INSTANCE_HEADER = "X-Agent-Instance"


def parse_proxy_auth(value: str) -> tuple[str, str] | None:
    """``Basic base64(user:pass)`` → ``(user, pass)``; None when absent or malformed."""
    scheme, _, encoded = value.partition(" ")
    if scheme.lower() != "basic" or not encoded:
        return None
    try:
        raw = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = raw.partition(":")
    return (user, password) if sep and user else None


def instance_of(peer_ip: str | None, header: str | None) -> str:
    """The instance key: the ``X-Agent-Instance`` header if given, else the client address."""
    if header:
        return header.strip()[:128]
    return peer_ip or "?"
