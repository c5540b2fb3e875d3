"""consumer.breaker.CircuitBreakers: closed -> open -> half-open -> closed/open (DESIGN §6)."""

from __future__ import annotations

import pytest

from consumer.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreakers

EP = "ep_one"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def changes() -> list[tuple[str, int]]:
    return []


@pytest.fixture
def breakers(clock: FakeClock, changes: list[tuple[str, int]]) -> CircuitBreakers:
    return CircuitBreakers(
        failures=3, cooldown_s=30.0, clock=clock, on_change=lambda key, s: changes.append((key, s))
    )


def fail(breakers: CircuitBreakers, times: int, key: str = EP) -> None:
    for _ in range(times):
        assert breakers.allow(key)
        breakers.record(key, success=False)


def test_unknown_endpoint_is_closed_and_allowed(breakers: CircuitBreakers) -> None:
    assert breakers.state(EP) == CLOSED
    assert breakers.allow(EP)


def test_opens_after_n_consecutive_failures(
    breakers: CircuitBreakers, changes: list[tuple[str, int]]
) -> None:
    fail(breakers, 2)
    assert breakers.state(EP) == CLOSED
    assert changes == []
    fail(breakers, 1)
    assert breakers.state(EP) == OPEN
    assert not breakers.allow(EP)
    assert changes == [(EP, OPEN)]


def test_success_resets_the_count(breakers: CircuitBreakers) -> None:
    fail(breakers, 2)
    assert breakers.allow(EP)
    breakers.record(EP, success=True)
    fail(breakers, 2)
    assert breakers.state(EP) == CLOSED
    fail(breakers, 1)
    assert breakers.state(EP) == OPEN


def test_endpoints_are_independent(breakers: CircuitBreakers) -> None:
    fail(breakers, 3, key="ep_bad")
    assert breakers.state("ep_bad") == OPEN
    assert breakers.state("ep_good") == CLOSED
    assert breakers.allow("ep_good")


def test_stays_open_until_the_cooldown_has_passed(
    breakers: CircuitBreakers, clock: FakeClock
) -> None:
    fail(breakers, 3)
    clock.advance(29.9)
    assert not breakers.allow(EP)
    assert breakers.state(EP) == OPEN


def test_half_open_after_cooldown_allows_exactly_one_probe(
    breakers: CircuitBreakers, clock: FakeClock
) -> None:
    fail(breakers, 3)
    clock.advance(30.0)
    assert breakers.allow(EP)
    assert breakers.state(EP) == HALF_OPEN
    assert not breakers.allow(EP)
    clock.advance(3600)
    assert not breakers.allow(EP)  # still one probe, however long it takes


def test_probe_success_closes(breakers: CircuitBreakers, clock: FakeClock) -> None:
    fail(breakers, 3)
    clock.advance(30)
    assert breakers.allow(EP)
    breakers.record(EP, success=True)
    assert breakers.state(EP) == CLOSED
    assert breakers.allow(EP)
    assert breakers.allow(EP)
    fail(breakers, 2)  # the count started again from zero
    assert breakers.state(EP) == CLOSED


def test_probe_failure_reopens_for_a_full_cooldown(
    breakers: CircuitBreakers, clock: FakeClock
) -> None:
    fail(breakers, 3)
    clock.advance(30)
    assert breakers.allow(EP)
    breakers.record(EP, success=False)  # one failure is enough when half-open
    assert breakers.state(EP) == OPEN
    clock.advance(29)
    assert not breakers.allow(EP)
    clock.advance(1)
    assert breakers.allow(EP)
    assert breakers.state(EP) == HALF_OPEN


def test_on_change_sequence(
    breakers: CircuitBreakers, clock: FakeClock, changes: list[tuple[str, int]]
) -> None:
    fail(breakers, 3)
    clock.advance(30)
    breakers.allow(EP)
    breakers.record(EP, success=False)
    clock.advance(30)
    breakers.allow(EP)
    breakers.record(EP, success=True)
    breakers.record(EP, success=True)  # already closed: no new change
    assert changes == [(EP, OPEN), (EP, HALF_OPEN), (EP, OPEN), (EP, HALF_OPEN), (EP, CLOSED)]


def test_failure_threshold_of_one() -> None:
    breakers = CircuitBreakers(failures=1, cooldown_s=1.0, clock=FakeClock())
    breakers.record(EP, success=False)
    assert breakers.state(EP) == OPEN


def test_is_open_does_not_take_the_probe_or_change_state() -> None:
    now = [0.0]
    breakers = CircuitBreakers(failures=1, cooldown_s=10, clock=lambda: now[0])
    assert not breakers.is_open("ep")
    breakers.record("ep", success=False)
    assert breakers.is_open("ep")
    now[0] = 10.0
    assert not breakers.is_open("ep")  # the cool-down is over: a probe may go
    assert breakers.state("ep") == OPEN  # ...but is_open did not move it to half-open
    assert breakers.allow("ep") is True
    assert breakers.state("ep") == HALF_OPEN
