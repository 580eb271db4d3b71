"""Pure core: the one spelling of a request's host, path and method that rules match.

An allow list is only as good as the match: ``/ok/../admin`` matches ``/ok/**`` as
written, and any upstream that normalises its paths (most do) serves ``/admin``. So
the gate matches what the upstream will read, and what cannot be read one way only is
refused with a stable reason:

``path_not_canonical``
    an encoded separator (``%2F``, ``%5C``) or backslash, an encoded ``%`` that forms
    another escape (``%252e``: decoded twice it is ``.``), a NUL or control character,
    a bad escape or bad UTF-8, a ``..`` that climbs above the root, a dot segment with
    parameters (``..;``: Tomcat reads it as ``..``), a fragment, or a target that is not
    an absolute path.
``host_not_canonical``
    a host that is not one name or one address: numeric IPv4 spellings other than the
    dotted quad (``2130706433``, ``0x7f.1``, ``0177.0.0.1``), IPv4-mapped IPv6, an
    empty label, characters outside a host name.
``method_not_canonical``
    a method that is not an upper-case token (``post``, ``GeT``): methods are
    case-sensitive, and an action that limits ``POST`` must see every ``POST``.

What is forwarded: the request target as sent when it is already canonical, else the
canonical path (dot segments resolved, repeated slashes collapsed, every surviving
segment exactly as the client spelled it) plus the query. Never the raw target that
matched differently.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

PATH_NOT_CANONICAL = "path_not_canonical"
HOST_NOT_CANONICAL = "host_not_canonical"
METHOD_NOT_CANONICAL = "method_not_canonical"
HOST_MISMATCH = "host_mismatch"
AMBIGUOUS_LENGTH = "ambiguous_length"
HEADERS_TOO_LARGE = "headers_too_large"
MAX_HEADERS = 64 << 10  # request header bytes: more is abuse, not an API call


class NotCanonical(ValueError):
    """A request part that cannot be matched one way only; ``reason`` is stable."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Path:
    match: str  # decoded, resolved: what the allow list matches (no query)
    target: str  # what is forwarded: raw when already canonical, else rebuilt + query
    changed: bool  # target differs from what the client sent


_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ENCODED_SEP = re.compile(r"%(2[Ff]|5[Cc]|00)")
_DOUBLE = re.compile(r"%25[0-9A-Fa-f]{2}")
_CONTROL = re.compile(r"[\x00-\x20\x7f]")
_DECODED_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DOT_PARAMS = re.compile(r"\.+;.*")
_METHOD = re.compile(r"[A-Z][A-Z0-9_-]*")


def path(raw: str) -> Path:
    """Canonicalise an origin-form request target ``/a/b?q``; raise :class:`NotCanonical`."""

    def refuse(why: str) -> NotCanonical:
        return NotCanonical(PATH_NOT_CANONICAL, f"path {raw[:200]!r}: {why}")

    raw_path, sep, query = raw.partition("?")
    if not raw_path.startswith("/"):
        raise refuse("not an absolute path")
    if "#" in raw_path:
        raise refuse("a fragment is never sent to a server")
    if _CONTROL.search(raw_path) or "\\" in raw_path:
        raise refuse("control character, space or backslash")
    if _BAD_ESCAPE.search(raw_path):
        raise refuse("'%' not followed by two hex digits")
    if _ENCODED_SEP.search(raw_path):
        raise refuse("encoded '/', '\\' or NUL")
    if _DOUBLE.search(raw_path):
        raise refuse("encoded '%' forming another escape (double encoding)")
    kept: list[tuple[str, str]] = []  # (raw segment, decoded segment)
    segments = raw_path.split("/")[1:]
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        try:
            decoded = unquote_to_bytes(seg).decode("utf-8")
        except UnicodeDecodeError:
            raise refuse("escape that is not UTF-8") from None
        if _DECODED_CONTROL.search(decoded):
            raise refuse("encoded control character")
        if decoded == "" and not last:
            continue  # "//": servers read one slash
        if decoded == ".":
            if last:
                kept.append(("", ""))
            continue
        if decoded == "..":
            if not kept or kept == [("", "")]:
                raise refuse("'..' climbs above the root")
            kept.pop()
            if last:
                kept.append(("", ""))
            continue
        if _DOT_PARAMS.fullmatch(decoded):
            raise refuse("dot segment with parameters ('..;')")
        kept.append((seg, decoded))
    match = "/" + "/".join(d for _, d in kept)
    rebuilt = "/" + "/".join(r for r, _ in kept)
    if rebuilt == raw_path:
        return Path(match, raw, False)
    return Path(match, rebuilt + (sep + query if sep else ""), True)


_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?")
_NUMERIC_LABEL = re.compile(r"(0x[0-9a-f]*|[0-9]+)")


def host(raw: str) -> str:
    """The one spelling of a host: lower case, no trailing dot, IPv6 compressed.

    Raises :class:`NotCanonical` for spellings that name an address another way.
    """

    def refuse(why: str) -> NotCanonical:
        return NotCanonical(HOST_NOT_CANONICAL, f"host {raw[:200]!r}: {why}")

    h = raw.strip("[]").lower()
    if not h:
        raise refuse("empty")
    if ":" in h:
        try:
            addr = ipaddress.IPv6Address(h)
        except ValueError:
            raise refuse("not an IPv6 address") from None
        if addr.ipv4_mapped is not None or addr.sixtofour is not None:
            raise refuse("IPv4 written as IPv6: use the IPv4 address")
        if addr.scope_id:
            raise refuse("zone index")
        return addr.compressed
    if h.endswith("."):
        h = h[:-1]
    labels = h.split(".")
    if all(_NUMERIC_LABEL.fullmatch(x) for x in labels):
        try:
            v4 = ipaddress.IPv4Address(h)
        except ValueError:
            raise refuse("numeric host that is not a dotted-quad IPv4 address") from None
        if str(v4) != h:
            raise refuse("IPv4 address with leading zeros")
        return h
    for label in labels:
        if not _LABEL.fullmatch(label):
            raise refuse(f"label {label!r} is not a host name label")
    if _NUMERIC_LABEL.fullmatch(labels[-1]) and not labels[-1].startswith("0x"):
        raise refuse("numeric top-level label")
    return h


_AUTHORITY = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(?::(?P<port>[0-9]{1,5}))?")


def authority(raw: str) -> tuple[str, int | None]:
    """``host[:port]`` of a Host header or authority → (host, port or None).

    Raises :class:`NotCanonical` (``host_mismatch``) when it is not one host and port.
    """
    m = _AUTHORITY.fullmatch(raw)
    port = int(m["port"]) if m and m["port"] else None
    if m is None or (port is not None and not 0 < port < 65536):
        raise NotCanonical(HOST_MISMATCH, f"bad Host {raw[:100]!r}")
    return m["host"].strip("[]"), port


def method(raw: str) -> str:
    """The method as sent when it is an upper-case token; else :class:`NotCanonical`."""
    if not _METHOD.fullmatch(raw):
        raise NotCanonical(METHOD_NOT_CANONICAL, f"method {raw[:40]!r}: use an upper-case token")
    return raw


@dataclass(frozen=True, slots=True)
class Request:
    """One request (or CONNECT) as it arrived, before any canonical spelling."""

    auth: str | None  # the Proxy-Authorization value, taken off the request
    two_auth: bool  # more than one Proxy-Authorization header
    tunnel_auth: tuple[str, str] | None  # credentials of the CONNECT this is inside
    method: str  # as sent (not upper-cased)
    host: str
    port: int
    target: str = ""  # the request target as sent; "" for CONNECT
    connect: bool = False
    scheme: str = "http"
    authority: str = ""
    host_headers: tuple[str, ...] = ()
    sni: str | None = None
    tunnel: tuple[str, int] | None = None  # the CONNECT target this request is inside
    header_bytes: int = 0
    lengths: int = 0  # Content-Length headers
    chunked: bool = False  # a Transfer-Encoding header


def check_request(req: Request, host_: str, port: int) -> None:
    """Raise :class:`canonical.NotCanonical` when the request names another host than
    where it goes, its body length is ambiguous, or its headers are too large (mitmproxy
    checks length too, unless validate_inbound_headers is off: this does not depend on it).
    """
    if req.header_bytes > MAX_HEADERS:
        raise NotCanonical(
            HEADERS_TOO_LARGE,
            f"request headers of {req.header_bytes} bytes (at most {MAX_HEADERS})",
        )
    target = req.tunnel
    if target is not None and target != (host_, port):
        raise NotCanonical(
            HOST_MISMATCH,
            f"request for {host_}:{port} inside a tunnel to {target[0]}:{target[1]}",
        )
    if len(req.host_headers) > 1:
        raise NotCanonical(HOST_MISMATCH, "more than one Host header")
    names = [req.authority] if req.authority else []
    names += req.host_headers
    if req.sni and target is not None:
        names.append(f"{req.sni}:{port}")
    default = 443 if req.scheme == "https" else 80
    for name in names:
        h, p = authority(name)
        if host(h) != host_ or (p or default) != port:
            raise NotCanonical(HOST_MISMATCH, f"Host {name[:100]!r} is not {host_}:{port}")
    if (req.lengths and req.chunked) or req.lengths > 1:
        raise NotCanonical(
            AMBIGUOUS_LENGTH, "both Content-Length and Transfer-Encoding, or two lengths"
        )
