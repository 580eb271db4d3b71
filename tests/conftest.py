"""Fixtures shared by the end-to-end modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.rig import Upstream, start_upstream


@pytest.fixture(scope="module")
def up() -> Iterator[Upstream]:
    """A plain-HTTP upstream on loopback, one per test module."""
    u = start_upstream()
    yield u
    u.server.shutdown()
