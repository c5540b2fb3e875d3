"""The circuit breaker as a pure state machine: trip window, cool-down back-off, ramp."""

from __future__ import annotations

import pytest

from consumer.breaker import Breaker, BreakerPolicy, CircuitState, SlidingWindow, Verdict, verdict_for

POLICY = BreakerPolicy(window_s=30, min_calls=20, failure_rate=0.5, cooldown_s=5, cooldown_max_s=40,
                       ramp_to=8, ramp_s=5)


def feed(breaker: Breaker, now: float, verdicts: list[Verdict]) -> list[CircuitState | None]:
    return [breaker.record(now, v, breaker.epoch) for v in verdicts]


@pytest.mark.parametrize(
    ("delivered", "code", "verdict"),
    [
        (True, 204, Verdict.SUCCESS),
        (False, 0, Verdict.FAILURE),  # timeout, connection or TLS error: no answer
        (False, 500, Verdict.FAILURE),
        (False, 503, Verdict.FAILURE),
        (False, 408, Verdict.FAILURE),
        (False, 429, Verdict.FAILURE),
        (False, 400, Verdict.REFUSED),
        (False, 404, Verdict.REFUSED),
        (False, 410, Verdict.REFUSED),
        (False, 301, Verdict.REFUSED),
    ],
)
def test_what_counts_against_the_endpoint(delivered: bool, code: int, verdict: Verdict) -> None:
    assert verdict_for(delivered, code) is verdict


def test_a_burst_below_the_minimum_number_of_calls_does_not_open_it() -> None:
    breaker = Breaker(POLICY)
    feed(breaker, 100.0, [Verdict.FAILURE] * 19)
    assert breaker.state is CircuitState.CLOSED


def test_it_opens_at_the_failure_rate_over_the_minimum_calls() -> None:
    breaker = Breaker(POLICY)
    feed(breaker, 100.0, [Verdict.SUCCESS] * 10 + [Verdict.FAILURE] * 9)
    assert breaker.state is CircuitState.CLOSED  # 19 calls: below the minimum
    assert feed(breaker, 100.5, [Verdict.FAILURE]) == [CircuitState.OPEN]  # 10 of 20 failed
    assert breaker.open_until == pytest.approx(105.5)


def test_refusing_handlers_never_open_it() -> None:
    breaker = Breaker(POLICY)
    feed(breaker, 100.0, [Verdict.REFUSED] * 100)
    assert breaker.state is CircuitState.CLOSED


def test_old_failures_leave_the_window() -> None:
    breaker = Breaker(POLICY)
    feed(breaker, 100.0, [Verdict.FAILURE] * 15)
    feed(breaker, 131.0, [Verdict.FAILURE] * 5)  # the first 15 are 31 s old
    assert breaker.state is CircuitState.CLOSED
    window = breaker.window.advance(131.0)
    assert (window.calls, window.failures) == (5, 5)


def test_open_admits_nothing_until_the_cooldown_then_one_probe() -> None:
    breaker = Breaker(POLICY)
    feed(breaker, 100.0, [Verdict.FAILURE] * 20)
    assert not breaker.admits(104.9, 0)
    assert breaker.blocked(104.9)
    assert breaker.admits(105.0, 0)  # the probe
    assert breaker.state is CircuitState.HALF_OPEN
    assert not breaker.admits(105.0, 1)  # one at a time


def test_a_failed_probe_doubles_the_cooldown_up_to_the_maximum() -> None:
    breaker = Breaker(POLICY)
    feed(breaker, 0.0, [Verdict.FAILURE] * 20)
    now = 0.0
    cooldowns = []
    for _ in range(5):
        now = breaker.open_until
        assert breaker.admits(now, 0)
        assert breaker.record(now, Verdict.FAILURE, breaker.epoch) is CircuitState.OPEN
        cooldowns.append(breaker.open_until - now)
    assert cooldowns == [10, 20, 40, 40, 40]


def test_the_ramp_doubles_the_share_per_round_then_closes() -> None:
    breaker = Breaker(POLICY)
    feed(breaker, 0.0, [Verdict.FAILURE] * 20)
    now = breaker.open_until
    rounds = []
    while breaker.state is not CircuitState.CLOSED:
        admitted = 0
        while breaker.admits(now, admitted):
            admitted += 1
        rounds.append(admitted)
        epoch = breaker.epoch
        for _ in range(admitted):
            breaker.record(now, Verdict.SUCCESS, epoch)
        now += 0.01
    assert rounds == [1, 2, 4]  # then the limit reaches ramp_to (8) and it closes
    assert breaker.cooldown_s == POLICY.cooldown_s


def test_the_ramp_closes_after_ramp_s_for_a_quiet_endpoint() -> None:
    breaker = Breaker(POLICY)
    feed(breaker, 0.0, [Verdict.FAILURE] * 20)
    now = breaker.open_until
    assert breaker.admits(now, 0)
    assert breaker.record(now, Verdict.SUCCESS, breaker.epoch) is None
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.admits(now + 5, 0)
    assert breaker.record(now + 5, Verdict.SUCCESS, breaker.epoch) is CircuitState.CLOSED


def test_a_failure_while_ramping_opens_it_again() -> None:
    breaker = Breaker(POLICY)
    feed(breaker, 0.0, [Verdict.FAILURE] * 20)
    now = breaker.open_until
    assert breaker.admits(now, 0)
    breaker.record(now, Verdict.SUCCESS, breaker.epoch)
    assert breaker.record(now, Verdict.FAILURE, breaker.epoch) is CircuitState.OPEN


def test_a_refusal_during_the_ramp_counts_as_the_endpoint_being_up() -> None:
    breaker = Breaker(POLICY)
    feed(breaker, 0.0, [Verdict.FAILURE] * 20)
    now = breaker.open_until
    assert breaker.admits(now, 0)
    breaker.record(now, Verdict.REFUSED, breaker.epoch)
    assert breaker.limit == 2


def test_a_call_from_before_the_state_change_does_not_decide_the_probe() -> None:
    breaker = Breaker(POLICY)
    stale = breaker.epoch  # a slow call admitted while closed
    feed(breaker, 0.0, [Verdict.FAILURE] * 20)
    now = breaker.open_until
    assert breaker.admits(now, 0)
    assert breaker.record(now, Verdict.FAILURE, stale) is None  # the old timeout ends now
    assert breaker.state is CircuitState.HALF_OPEN


def test_sliding_window_counts_by_kind() -> None:
    window = SlidingWindow(10)
    window.add(0.2, Verdict.SUCCESS)
    window.add(0.7, Verdict.FAILURE)
    window.add(5.0, Verdict.REFUSED)
    assert (window.calls, window.failures, window.refused) == (3, 1, 1)
    window.advance(10.5)  # second 0 left the window
    assert (window.calls, window.failures, window.refused) == (1, 0, 1)
    window.advance(100)
    assert window.calls == 0


def test_a_quiet_ramping_circuit_settles_closed_after_ramp_s() -> None:
    breaker = Breaker(POLICY)
    feed(breaker, 0.0, [Verdict.FAILURE] * 20)
    now = breaker.open_until
    assert breaker.admits(now, 0)
    breaker.record(now, Verdict.SUCCESS, breaker.epoch)
    assert breaker.settle(now + 4.9) is None
    assert breaker.settle(now + 5.0) is CircuitState.CLOSED
    assert breaker.settle(now + 6.0) is None
