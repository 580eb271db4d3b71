"""The one spelling of a request (pure): a truth table per part, exact reasons asserted."""

from __future__ import annotations

import pytest

from axme_fw import canonical
from axme_fw.canonical import NotCanonical


@pytest.mark.parametrize(
    ("raw", "match", "target"),
    [
        ("/", "/", "/"),
        ("/a/", "/a/", "/a/"),
        ("/ok/x?q=/../y", "/ok/x", "/ok/x?q=/../y"),
        ("/ok/a%20b", "/ok/a b", "/ok/a%20b"),  # decoded to match, forwarded as sent
        ("/ok/%41", "/ok/A", "/ok/%41"),
        ("/ok/../admin", "/admin", "/admin"),
        ("/ok/%2e%2E/admin", "/admin", "/admin"),
        ("/ok/./a", "/ok/a", "/ok/a"),
        ("//ok///a", "/ok/a", "/ok/a"),
        ("/ok/a/..", "/ok/", "/ok/"),
        ("/ok/a/.", "/ok/a/", "/ok/a/"),
        ("/ok/%2e?x", "/ok/", "/ok/?x"),
        ("/caf%C3%A9", "/café", "/caf%C3%A9"),
    ],
)
def test_paths(raw: str, match: str, target: str) -> None:
    got = canonical.path(raw)
    assert (got.match, got.target, got.changed) == (match, target, target != raw)


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("ok", "not an absolute path"),
        ("*", "not an absolute path"),
        ("/a#b", "a fragment is never sent to a server"),
        ("/a b", "control character, space or backslash"),
        ("/a\\b", "control character, space or backslash"),
        ("/a%2", "'%' not followed by two hex digits"),
        ("/a%zz", "'%' not followed by two hex digits"),
        ("/a%2Fb", "encoded '/', '\\' or NUL"),
        ("/a%5cb", "encoded '/', '\\' or NUL"),
        ("/a%00", "encoded '/', '\\' or NUL"),
        ("/a%252e", "encoded '%' forming another escape (double encoding)"),
        ("/a%0a", "encoded control character"),
        ("/a%ff", "escape that is not UTF-8"),
        ("/..", "'..' climbs above the root"),
        ("/a/../..", "'..' climbs above the root"),
        ("/./..", "'..' climbs above the root"),
        ("/a/..;/b", "dot segment with parameters ('..;')"),
        ("/a/.;x", "dot segment with parameters ('..;')"),
    ],
)
def test_paths_refused(raw: str, why: str) -> None:
    with pytest.raises(NotCanonical) as info:
        canonical.path(raw)
    assert info.value.reason == "path_not_canonical"
    assert info.value.detail == f"path {raw!r}: {why}"


@pytest.mark.parametrize(
    ("raw", "host"),
    [
        ("api.openai.com", "api.openai.com"),
        ("API.OpenAI.com.", "api.openai.com"),
        ("127.0.0.1", "127.0.0.1"),
        ("[::1]", "::1"),
        ("0:0:0:0:0:0:0:1", "::1"),
        ("svc_1.internal", "svc_1.internal"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
    ],
)
def test_hosts(raw: str, host: str) -> None:
    assert canonical.host(raw) == host


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        ("", "empty"),
        ("127.1", "numeric host that is not a dotted-quad IPv4 address"),
        ("2130706433", "numeric host that is not a dotted-quad IPv4 address"),
        ("0x7f.0.0.1", "numeric host that is not a dotted-quad IPv4 address"),
        ("0177.0.0.1", "numeric host that is not a dotted-quad IPv4 address"),
        ("::ffff:127.0.0.1", "IPv4 written as IPv6: use the IPv4 address"),
        ("2002:7f00:1::1", "IPv4 written as IPv6: use the IPv4 address"),
        ("fe80::1%eth0", "zone index"),
        ("a..b", "label '' is not a host name label"),
        ("bücher.example", "label 'bücher' is not a host name label"),
        ("a.-b", "label '-b' is not a host name label"),
        ("host.123", "numeric top-level label"),
    ],
)
def test_hosts_refused(raw: str, why: str) -> None:
    with pytest.raises(NotCanonical) as info:
        canonical.host(raw)
    assert info.value.reason == "host_not_canonical"
    assert info.value.detail == f"host {raw!r}: {why}"


@pytest.mark.parametrize("raw", ["GET", "POST", "PROPFIND", "M-SEARCH"])
def test_methods(raw: str) -> None:
    assert canonical.method(raw) == raw


@pytest.mark.parametrize("raw", ["get", "GeT", "", "GET ", "G\u00c9T"])
def test_methods_refused(raw: str) -> None:
    with pytest.raises(NotCanonical) as info:
        canonical.method(raw)
    assert info.value.reason == "method_not_canonical"
