"""Truth tables for the pure windowed-limit engine. Time is a plain float."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from axme_fw.limits import (
    Exceeded,
    LimitSpec,
    OnExceed,
    Reservation,
    Windows,
    retry_after_header,
)

H = 3600.0


def spec(
    key: str = "requests",
    max: float = 3,
    per: float = 6 * H,
    on_exceed: OnExceed = OnExceed.KILL,
    warn_at: float | None = None,
) -> LimitSpec:
    return LimitSpec(key=key, max=max, per=per, on_exceed=on_exceed, warn_at=warn_at)


def series(w: Windows, agent: str, key: str) -> Any:
    return w._series[agent][key]


# -- admit ------------------------------------------------------------------------------


def test_three_per_six_hours_then_fourth_exceeded_with_retry_after() -> None:
    w = Windows()
    deploy = spec("actions.deploy", max=3, per=6 * H)
    assert w.admit("deployer", [deploy], now=0.0) is None
    assert w.admit("deployer", [deploy], now=100.0) is None
    assert w.admit("deployer", [deploy], now=200.0) is None
    refused = w.admit("deployer", [deploy], now=1000.0)
    assert refused == Exceeded(spec=deploy, used=3.0, retry_after=6 * H - 1000.0)
    assert w.used("deployer", "actions.deploy", 6 * H, 1000.0) == 3.0  # refusal records nothing
    # exactly when the first event expires, the fourth fits
    assert w.admit("deployer", [deploy], now=6 * H - 1.0) is not None
    assert w.admit("deployer", [deploy], now=6 * H) is None


@pytest.mark.parametrize(
    ("now", "used"),
    [
        (0.0, 1.0),
        (59.999, 1.0),
        (60.0, 0.0),  # expires at t + per exactly: the window is (now - per, now]
        (60.001, 0.0),
        (1e9, 0.0),
    ],
)
def test_window_boundary_is_exclusive_at_t_plus_per(now: float, used: float) -> None:
    w = Windows()
    assert w.admit("a", [spec(per=60.0)], now=0.0) is None
    assert w.used("a", "requests", 60.0, now) == used


@pytest.mark.parametrize(
    ("events", "now", "amount", "max", "retry_after"),
    [
        ([0.0, 10.0, 20.0], 30.0, 1.0, 3, 30.0),  # oldest expires at 60
        ([0.0, 10.0, 20.0], 30.0, 2.0, 3, 40.0),  # two must expire: second at 70
        ([0.0, 0.0, 20.0], 30.0, 2.0, 3, 30.0),  # ties expire together
        ([5.0], 30.0, 1.0, 1, 35.0),
        ([], 30.0, 5.0, 3, 60.0),  # can never fit: a full window
        ([0.0], 30.0, 1.0, 0, 60.0),  # max 0 blocks everything
    ],
)
def test_retry_after_is_time_until_enough_room(
    events: list[float], now: float, amount: float, max: float, retry_after: float
) -> None:
    w = Windows()
    unlimited = spec(max=1e9, per=60.0)
    for t in events:
        assert w.admit("a", [unlimited], now=t) is None
    refused = w.admit("a", [spec(max=max, per=60.0)], now=now, amount=amount)
    assert isinstance(refused, Exceeded)
    assert refused.retry_after == pytest.approx(retry_after)
    assert refused.used == len(events)


def test_second_spec_refuses_so_first_is_not_recorded() -> None:
    w = Windows()
    requests = spec("requests", max=500, per=H)
    deploy = spec("actions.deploy", max=1, per=6 * H)
    assert w.admit("d", [requests, deploy], now=0.0) is None
    refused = w.admit("d", [requests, deploy], now=1.0)
    assert isinstance(refused, Exceeded)
    assert refused.spec is deploy
    assert w.used("d", "requests", H, 1.0) == 1.0
    assert w.used("d", "actions.deploy", 6 * H, 1.0) == 1.0


def test_first_failing_spec_in_order_is_reported() -> None:
    w = Windows()
    a, b = spec("x", max=0), spec("y", max=0)
    assert w.admit("d", [a, b], now=0.0) == Exceeded(a, 0.0, 6 * H)
    assert w.admit("d", [b, a], now=0.0) == Exceeded(b, 0.0, 6 * H)


def test_specs_sharing_a_key_count_one_event_stream() -> None:
    w = Windows()
    burst, sustained = spec(max=2, per=60.0), spec(max=3, per=H)
    verdicts = [w.admit("a", [burst, sustained], now=t) is None for t in (0, 1, 2, 61, 62)]
    assert verdicts == [True, True, False, True, False]
    assert w.used("a", "requests", H, 62.0) == 3.0  # recorded once per admit, not per spec


def test_counting_is_per_agent_and_per_key() -> None:
    w = Windows()
    one = spec(max=1)
    assert w.admit("a", [one], now=0.0) is None
    assert w.admit("b", [one], now=0.0) is None
    assert w.admit("a", [spec("other", max=1)], now=0.0) is None
    assert w.admit("a", [one], now=0.0) is not None


def test_float_costs_sum_like_decimals() -> None:
    w = Windows()
    budget = spec("cost_usd", max=1.0, per=H)
    assert all(w.admit("a", [budget], now=float(i), amount=0.1) is None for i in range(10))
    assert w.admit("a", [budget], now=11.0, amount=0.1) is not None


@pytest.mark.parametrize("amount", [-1.0, math.nan, math.inf])
def test_admit_rejects_bad_amounts(amount: float) -> None:
    with pytest.raises(ValueError, match="admit: amount must be a non-negative number"):
        Windows().admit("a", [spec()], now=0.0, amount=amount)


def test_admit_with_no_specs_records_nothing() -> None:
    w = Windows()
    assert w.admit("a", [], now=0.0) is None
    assert w.snapshot()["series"] == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"per": 0.0}, "limit 'requests': per must be a positive number of seconds, got 0.0"),
        ({"per": math.inf}, "limit 'requests': per must be a positive number of seconds"),
        ({"max": -1.0}, "limit 'requests': max must be a non-negative number, got -1.0"),
        ({"warn_at": 0.0}, r"limit 'requests': warn_at must be in \(0, 1\], got 0.0"),
        ({"warn_at": 1.5}, r"limit 'requests': warn_at must be in \(0, 1\], got 1.5"),
        ({"key": ""}, "limit: key must not be empty"),
    ],
)
def test_limit_spec_validation(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        spec(**kwargs)


# -- hot reload: per changes --------------------------------------------------------------


def test_per_changed_on_reload_keeps_counts() -> None:
    w = Windows()
    hourly = spec(max=10, per=H)
    for t in (0.0, 1000.0, 2000.0, 3000.0):
        assert w.admit("a", [hourly], now=t) is None
    # reload: 1h -> 30m. Only events within the new 30 minutes count
    half = spec(max=10, per=H / 2)
    assert w.used("a", "requests", H / 2, 3100.0) == 2.0  # 2000, 3000
    assert w.admit("a", [half], now=3100.0) is None
    # reload back to 1h before the old events expire: they still count
    assert w.used("a", "requests", H, 3100.0) == 5.0
    # grow to 2h: events kept for the longest window seen (1h) still count
    assert w.used("a", "requests", 2 * H, 3100.0) == 5.0
    assert w.used("a", "requests", 2 * H, 2 * H - 1) == 5.0


def test_shrunk_then_grown_window_is_exact_across_many_events() -> None:
    w = Windows()
    unlimited = spec(max=1e9, per=100.0)
    times = [float(t) for t in range(0, 1000, 3)]
    for t in times:
        w.admit("a", [unlimited], now=t)
        for per in (7.0, 100.0, 31.5):
            expected = sum(1 for x in times if x <= t and x + per > t)
            assert w.used("a", "requests", per, t) == expected


# -- reservations -------------------------------------------------------------------------


@pytest.mark.parametrize("estimate", [0.5, 1.0, 2.5, 4.0, 10.0])
def test_twenty_concurrent_reserves_at_95_percent_stay_within_bound(estimate: float) -> None:
    w = Windows()
    budget = spec("cost_usd", max=50.0, per=24 * H, on_exceed=OnExceed.PARK)
    assert w.admit("a", [budget], now=0.0, amount=47.5) is None
    results = [w.reserve("a", budget, estimate, now=1.0) for _ in range(20)]
    held = [r for r in results if isinstance(r, Reservation)]
    assert held  # under max: at least one call proceeds
    assert w.used("a", "cost_usd", budget.per, 1.0) + w.reserved("a", "cost_usd") < 50.0 + estimate
    for r in held:
        w.settle(r, r.amount, now=2.0)  # actual == estimate
    spent = w.used("a", "cost_usd", budget.per, 2.0)
    assert spent - 50.0 < estimate  # the documented bound: less than one estimate
    assert len(held) == max(1, math.floor(2.5 / estimate + 1e-9))
    # once at or over, nothing more is reserved
    if spent >= 50.0:
        assert isinstance(w.reserve("a", budget, 0.01, now=3.0), Exceeded)


@pytest.mark.parametrize(
    ("used", "held", "amount", "admitted"),
    [
        (0.0, [], 5.0, True),
        (9.0, [], 5.0, True),  # alone and below max: may overshoot by its estimate
        (10.0, [], 0.5, False),  # at max
        (11.0, [], 0.5, False),  # over
        (5.0, [4.0], 1.0, True),  # fits with what is held
        (5.0, [4.0], 2.0, False),  # does not fit and something else is in flight
        (0.0, [10.0], 0.1, False),  # held alone reaches max
    ],
)
def test_reserve_rule(used: float, held: list[float], amount: float, admitted: bool) -> None:
    w = Windows()
    budget = spec("cost_usd", max=10.0, per=H)
    if used:
        w.admit("a", [spec("cost_usd", max=1e9, per=H)], now=0.0, amount=used)
    for h in held:
        assert isinstance(w.reserve("a", budget, h, now=0.0), Reservation)
    result = w.reserve("a", budget, amount, now=0.0)
    assert isinstance(result, Reservation) is admitted
    if isinstance(result, Exceeded):
        assert result.used == used + sum(held)


def test_settle_records_actual_once_and_release_drops() -> None:
    w = Windows()
    budget = spec("cost_usd", max=10.0, per=H)
    r1 = w.reserve("a", budget, 3.0, now=0.0)
    r2 = w.reserve("a", budget, 3.0, now=0.0)
    assert isinstance(r1, Reservation) and isinstance(r2, Reservation)
    assert w.reserved("a", "cost_usd") == 6.0
    w.settle(r1, 1.25, now=5.0)
    w.settle(r1, 100.0, now=6.0)  # second settle is a no-op
    assert w.used("a", "cost_usd", H, 6.0) == 1.25
    assert w.reserved("a", "cost_usd") == 3.0
    w.release(r2)
    w.release(r2)
    w.settle(r2, 9.0, now=7.0)  # released: settle is a no-op too
    assert w.reserved("a", "cost_usd") == 0.0
    assert w.used("a", "cost_usd", H, 7.0) == 1.25
    assert w.used("a", "cost_usd", H, 5.0 + H) == 0.0  # recorded at settle time


@pytest.mark.parametrize("actual", [math.nan, -1.0, math.inf])
def test_settle_with_unusable_actual_records_the_estimate(actual: float) -> None:
    w = Windows()
    r = w.reserve("a", spec("cost_usd", max=10.0, per=H), 2.0, now=0.0)
    assert isinstance(r, Reservation)
    w.settle(r, actual, now=1.0)
    assert w.used("a", "cost_usd", H, 1.0) == 2.0


def test_reservations_count_against_admit() -> None:
    w = Windows()
    budget = spec("cost_usd", max=10.0, per=H)
    assert isinstance(w.reserve("a", budget, 8.0, now=0.0), Reservation)
    refused = w.admit("a", [budget], now=0.0, amount=3.0)
    assert isinstance(refused, Exceeded)
    assert refused.used == 8.0
    assert refused.retry_after == H  # expiry alone can never make room


def test_reserve_refusal_retry_after_follows_expiry() -> None:
    w = Windows()
    budget = spec("cost_usd", max=10.0, per=100.0)
    w.admit("a", [budget], now=0.0, amount=6.0)
    w.admit("a", [budget], now=50.0, amount=4.0)
    refused = w.reserve("a", budget, 1.0, now=60.0)
    assert isinstance(refused, Exceeded)
    assert refused.retry_after == 40.0  # at t=100 the 6.0 expires


def test_reset_keeps_reservations_in_flight() -> None:
    w = Windows()
    budget = spec("cost_usd", max=10.0, per=H)
    w.admit("a", [budget], now=0.0, amount=9.0)
    r = w.reserve("a", budget, 0.5, now=0.0)
    assert isinstance(r, Reservation)
    w.reset("a", "cost_usd")
    assert w.used("a", "cost_usd", H, 1.0) == 0.0
    assert w.reserved("a", "cost_usd") == 0.5
    w.settle(r, 0.4, now=2.0)
    assert w.used("a", "cost_usd", H, 2.0) == 0.4


@pytest.mark.parametrize("amount", [-0.1, math.nan])
def test_reserve_rejects_bad_amounts(amount: float) -> None:
    with pytest.raises(ValueError, match="reserve: amount must be a non-negative number"):
        Windows().reserve("a", spec("cost_usd"), amount, now=0.0)


# -- warnings, reset ------------------------------------------------------------------------


def test_warn_once_per_window_and_rearm() -> None:
    w = Windows()
    budget = spec("cost_usd", max=10.0, per=100.0, warn_at=0.8)
    trace = []
    for t, amount in [(0.0, 5.0), (1.0, 3.0), (2.0, 1.0), (3.0, 0.5)]:
        w.admit("a", [budget], now=t, amount=amount)
        trace.append(w.warn_crossed("a", budget, t))
    assert trace == [False, True, False, False]  # 5, 8 (crosses), 9, 9.5
    assert w.warn_crossed("a", budget, 100.0) is False  # the 5.0 expired: 4.5, re-armed
    w.admit("a", [budget], now=101.0, amount=7.0)
    assert w.warn_crossed("a", budget, 101.0) is True  # crosses again: 1 + 0.5 + 7
    assert w.warn_crossed("a", budget, 102.0) is False


def test_warn_without_warn_at_never_fires() -> None:
    w = Windows()
    budget = spec("cost_usd", max=1.0)
    w.admit("a", [budget], now=0.0)
    assert w.warn_crossed("a", budget, 0.0) is False


def test_reset_one_key_or_all() -> None:
    w = Windows()
    both = [spec("requests", max=1), spec("actions.deploy", max=1)]
    assert w.admit("a", both, now=0.0) is None
    assert w.admit("b", both, now=0.0) is None
    w.reset("a", "actions.deploy")
    assert w.used("a", "actions.deploy", 6 * H, 0.0) == 0.0
    assert w.used("a", "requests", 6 * H, 0.0) == 1.0
    w.reset("a")
    assert w.admit("a", both, now=0.0) is None
    assert w.used("b", "requests", 6 * H, 0.0) == 1.0
    w.reset("nobody")
    w.reset("nobody", "requests")


# -- snapshot / restore -------------------------------------------------------------------


def test_snapshot_restore_round_trip() -> None:
    w = Windows()
    requests, budget = spec(max=5, per=H), spec("cost_usd", max=10.0, per=100.0, warn_at=0.5)
    for t in (0.0, 10.0, 20.0):
        w.admit("a", [requests], now=t)
    w.admit("b", [budget], now=15.0, amount=6.0)
    assert w.warn_crossed("b", budget, 15.0) is True
    data = json.loads(json.dumps(w.snapshot()))
    back = Windows.restore(data, now=30.0)
    assert back.used("a", "requests", H, 30.0) == 3.0
    assert back.used("b", "cost_usd", 100.0, 30.0) == 6.0
    assert back.warn_crossed("b", budget, 30.0) is False  # already warned: not again
    assert back.snapshot() == w.snapshot()
    later = Windows.restore(data, now=115.0)  # the cost event is older than its window
    assert [entry["agent"] for entry in later.snapshot()["series"]] == ["a"]


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"version": 99, "series": []},
        {"version": 1, "series": "nope"},
        {"version": 1},
        [],
        None,
    ],
)
def test_restore_garbage_whole(data: Any) -> None:
    assert Windows.restore(data, now=0.0).snapshot() == {"version": 1, "series": []}


def test_restore_skips_garbage_entries_and_keeps_good_ones() -> None:
    good = {"agent": "a", "key": "requests", "longest": 100.0, "events": [[1.0, 1.0]]}
    data = {
        "version": 1,
        "series": [
            "junk",
            None,
            {"agent": 1, "key": "requests", "longest": 100.0, "events": []},
            {"agent": "a", "key": "", "longest": 100.0, "events": [[1.0, 1.0]]},
            {"agent": "a", "key": "x", "longest": -5, "events": [[1.0, 1.0]]},
            {"agent": "a", "key": "x", "longest": True, "events": [[1.0, 1.0]]},
            {"agent": "a", "key": "x", "longest": "1h", "events": [[1.0, 1.0]]},
            {"agent": "a", "key": "x", "longest": 100.0, "events": "lots"},
            good,
            {
                "agent": "a",
                "key": "cost_usd",
                "longest": 100.0,
                "events": [
                    [2.0, 1.5],
                    [1.0],
                    "x",
                    [None, 1.0],
                    [True, 1.0],
                    [1.0, -1.0],
                    [1.0, "1"],
                    [math.nan, 1.0],
                    [1.0, math.inf],
                    [0.5, 0.25],  # out of order: sorted on restore
                    [500.0, 1.0],  # in the future: dated now
                ],
            },
        ],
    }
    back = Windows.restore(data, now=10.0)
    assert back.used("a", "requests", 100.0, 10.0) == 1.0
    assert back.used("a", "cost_usd", 100.0, 10.0) == 2.75
    assert series(back, "a", "cost_usd").times == [0.5, 2.0, 10.0]
    assert back.used("a", "cost_usd", 100.0, 102.0) == 1.0  # only the re-dated event left
    assert list(back._series) == ["a"]
    assert sorted(back._series["a"]) == ["cost_usd", "requests"]


# -- memory and cost ------------------------------------------------------------------------


def test_prune_bounds_memory() -> None:
    w = Windows()
    for i in range(1000):
        w.admit(f"agent-{i}", [spec(max=10, per=60.0)], now=float(i % 10))
    w.admit("long", [spec("cost_usd", max=10, per=H)], now=0.0)
    w.prune(now=59.0)
    assert len(w._series) == 1001
    w.prune(now=70.0)
    assert list(w._series) == ["long"]
    w.prune(now=70.0, horizon={"cost_usd": 60.0})  # config now says 1m: forget the hour
    assert w._series == {}


def test_prune_horizon_drops_windows_of_older_configs() -> None:
    w = Windows()
    w.admit("a", [spec(max=100, per=H)], now=0.0)
    w.admit("a", [spec(max=100, per=60.0)], now=100.0)
    assert sorted(series(w, "a", "requests").cursors) == [60.0, H]
    w.prune(now=100.0, horizon={"requests": 60.0})
    s = series(w, "a", "requests")
    assert list(s.cursors) == [60.0]
    assert s.times == [100.0]
    assert w.used("a", "requests", 60.0, 100.0) == 1.0


def test_live_events_stay_bounded_by_the_window_under_steady_traffic() -> None:
    w = Windows()
    hourly = spec(max=500, per=H)
    admitted = 0
    for i in range(50_000):
        admitted += w.admit("a", [hourly], now=i * 2.0) is None
        s = series(w, "a", "requests")
        assert s.live() <= 500
        assert len(s.times) <= 2 * 500 + 64  # compaction keeps dead space bounded
        assert len(s.cursors) == 1
    assert admitted == 50_000 // 1800 * 500 + 500


def test_admit_on_ten_thousand_agents_is_constant_work_per_agent() -> None:
    w = Windows()
    specs = [spec("requests", max=500, per=H), spec("actions.deploy", max=3, per=6 * H)]
    for round_ in range(3):
        for i in range(10_000):
            assert w.admit(f"agent-{i}", specs, now=float(round_)) is None
    assert len(w._series) == 10_000
    for keys in w._series.values():
        assert sorted(keys) == ["actions.deploy", "requests"]
        for s in keys.values():
            assert len(s.times) == 3
            assert len(s.cursors) == 1  # no rebuilds: one running sum per window
            assert s.cursors[s.longest].start == 0
    assert w.reserved("agent-0", "requests") == 0.0
    assert w._held == {}


def test_a_stepped_back_clock_keeps_order() -> None:
    w = Windows()
    unlimited = spec(max=100, per=60.0)
    w.admit("a", [unlimited], now=10.0)
    w.admit("a", [unlimited], now=5.0)  # dated 10.0
    assert series(w, "a", "requests").times == [10.0, 10.0]
    assert w.used("a", "requests", 60.0, 69.0) == 2.0
    assert w.used("a", "requests", 60.0, 70.0) == 0.0


# -- header ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "header"),
    [(0.0, "1"), (0.001, "1"), (1.0, "1"), (1.0001, "2"), (59.5, "60"), (-3.0, "1")],
)
def test_retry_after_header(seconds: float, header: str) -> None:
    assert retry_after_header(seconds) == header


@pytest.mark.parametrize("seconds", [math.inf, math.nan])
def test_retry_after_header_rejects_non_finite(seconds: float) -> None:
    with pytest.raises(ValueError, match="retry_after_header: not a finite number"):
        retry_after_header(seconds)


def test_assume_lost_adds_the_last_intervals_pace_once_per_series() -> None:
    from axme_fw.limits_series import assume_lost

    data = {
        "version": 1,
        "series": [
            {
                "agent": "a",
                "key": "requests",
                "longest": 60.0,
                "events": [[10.0, 1.0], [99.5, 1.0], [99.9, 2.0]],
            },
            {"agent": "b", "key": "requests", "longest": 60.0, "events": [[10.0, 1.0]]},
            "garbage",
        ],
    }
    out = assume_lost(data, saved_at=100.0, interval=1.0)
    assert out["series"][0]["events"][-1] == [100.0, 3.0]
    assert out["series"][1]["events"] == [[10.0, 1.0]]  # idle in the last second: nothing assumed
    assert out["series"][2] == "garbage"
    w = Windows.restore(out, now=100.5)
    assert w.used("a", "requests", 60.0, 100.5) == 6.0  # the event at t=10 has expired
