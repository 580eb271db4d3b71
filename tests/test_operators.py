"""Operators: tokens, roles, the brake on guessing, rules parsing, and the 202 path."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from axme_fw import admin_ops
from axme_fw.operators import Brake, authenticate, bearer
from axme_fw.rules import RulesError, load_dir
from axme_fw.ruleset import EMPTY, Operator

H = hashlib.sha256(b"s3cret").hexdigest()
OPS = {"alice": Operator("alice", "operator", H), "vic": Operator("vic", "viewer", "0" * 64)}


def test_bearer_and_authenticate() -> None:
    assert bearer("Bearer s3cret") == "s3cret" and bearer("bearer  s3cret ") == "s3cret"
    assert bearer("Basic abc") is None and bearer("Bearer ") is None and bearer(None) is None
    assert authenticate(OPS, "s3cret") == OPS["alice"]
    assert authenticate(OPS, "s3cre") is None and authenticate(OPS, None) is None
    assert authenticate({}, "s3cret") is None


def test_roles() -> None:
    assert OPS["alice"].may("operator") and OPS["alice"].may("viewer")
    assert OPS["vic"].may("viewer") and not OPS["vic"].may("operator")


def test_brake_slows_an_address_after_repeated_failures_then_forgives() -> None:
    b = Brake(max_failures=3, window=10.0)
    for i in range(3):
        assert b.retry_after("1.2.3.4", float(i)) == 0.0
        b.failed("1.2.3.4", float(i))
    assert b.retry_after("1.2.3.4", 3.0) == pytest.approx(7.0)
    assert b.retry_after("5.6.7.8", 3.0) == 0.0  # per address
    assert b.retry_after("1.2.3.4", 10.5) == 0.0  # the oldest left the window


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("operators:\n  alice: {role: admin, token_sha256: " + H + "}\n", "unknown role 'admin'"),
        ("operators:\n  alice: {role: viewer}\n", "operators.alice.token_sha256: required"),
        ("operators:\n  alice: {role: viewer, token_sha256: abc}\n", "must be 64 hex"),
        ("operators:\n  alice: {role: viewer, token_sha256: " + H + ", x: 1}\n", "unknown key"),
    ],
)
def test_operator_rules_errors_name_file_line_and_key(
    tmp_path: Path, text: str, error: str
) -> None:
    (tmp_path / "ops.yaml").write_text(text)
    with pytest.raises(RulesError) as exc:
        load_dir(tmp_path)
    assert error in str(exc.value) and f"{tmp_path / 'ops.yaml'}:2:" in str(exc.value)


def test_an_operator_defined_twice_is_an_error(tmp_path: Path) -> None:
    for name in ("a.yaml", "b.yaml"):
        (tmp_path / name).write_text(f"operators:\n  alice: {{role: viewer, token_sha256: {H}}}\n")
    with pytest.raises(RulesError, match=r"operators\.alice: already defined at"):
        load_dir(tmp_path)


def test_a_kill_not_confirmed_within_the_deadline_is_202(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin_ops, "CONFIRM_WITHIN", 0.05)
    ops = admin_ops.Operations(
        rules=lambda: EMPTY,  # never advances: no proxy applies the write
        rules_dir=lambda: tmp_path,
        state_dir=tmp_path,
        reload=lambda changed: None,
        addresses=lambda: ([], None),
        audit=lambda *a, **k: None,
        metrics_registry=None,  # type: ignore[arg-type]
    )
    status, body = asyncio.run(ops.kill("deployer", "block", "why", "api:alice", "127.0.0.1"))
    assert status == 202 and body["error"] == "not_confirmed" and body["revision"] == 1
    assert "within 0.05 s" in body["detail"]
