"""Health (pure) and alert formatting."""

from __future__ import annotations

from axme_fw.alerts import redact, text_for
from axme_fw.health import Health


def test_stale_once_until_recovered_then_again() -> None:
    h = Health()
    assert h.saw("a", "pod-1", now=0.0) is False
    assert h.sweep(0.5, lambda _a: 1.0) == []
    assert h.sweep(1.0, lambda _a: 1.0) == ["a"]  # not seen for stale_after: stale
    assert h.sweep(2.0, lambda _a: 1.0) == []  # once, not at every sweep
    assert h.state("a", None) == "stale"
    assert h.saw("a", "pod-1", now=2.5) is True  # recovered
    assert h.state("a", None) == "active"
    assert h.sweep(3.5, lambda _a: 1.0) == ["a"]


def test_states_and_instances() -> None:
    h = Health()
    assert h.state("ghost", None) == "never_seen"
    h.saw("a", "pod-1", 0.0)
    h.saw("a", "pod-2", 5.0)
    assert h.state("a", "block") == "killed"
    assert h.state("a", "park") == "paused"
    h.sweep(5.5, lambda _a: 1.0)
    assert h.instances["a"]["pod-1"].stale and not h.instances["a"]["pod-2"].stale
    assert h.agents["a"].requests == 2


def test_reset_after_resume_restarts_the_clock() -> None:
    h = Health()
    h.saw("a", "i", 0.0)
    h.sweep(10.0, lambda _a: 1.0)
    h.reset("a", 10.0)
    assert h.state("a", None) == "active"
    assert h.sweep(10.5, lambda _a: 1.0) == []


def test_snapshot_round_trip_and_garbage() -> None:
    h = Health()
    h.saw("a", "pod-1", 1.0)
    back = Health.restore(h.snapshot())
    assert back.agents["a"].last == 1.0 and back.instances["a"]["pod-1"].requests == 1
    junk = Health.restore({"agents": {"x": "bad", 3: [1, 2, 3]}, "instances": []})
    assert junk.agents == {} and junk.instances == {}


def test_alert_text_is_slack_readable_and_webhook_secrets_are_redacted() -> None:
    assert text_for("agent.killed", {"agent": "deployer", "by": "cli:al", "reason": "loop"}) == (
        "axme-fw agent.killed: deployer by cli:al: loop"
    )
    assert redact("https://hooks.slack.com/services/T0/B0/SECRET") == "https://hooks.slack.com/…"
    assert redact("http://127.0.0.1:9000/x?token=1") == "http://127.0.0.1:9000/…"
