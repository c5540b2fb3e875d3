"""Per-endpoint circuit breaker: a pure state machine with an injected clock (docs/architecture.md).

It never spends a delivery's attempts: it only says whether a call may start now. A
delivery that meets an open circuit is held (consumer.gate, the held topic) and keeps its
attempt number.

- Closed: calls pass. It opens when, over the last `window_s` seconds, at least `min_calls`
  calls were made and at least `failure_rate` of them failed in a way that says the endpoint
  is unavailable (`Verdict.FAILURE`: timeouts, connection and TLS errors, 5xx, 408, 429).
  Other answers (2xx, 3xx, other 4xx) show the endpoint is up and never open it.
- Open: no call starts until `open_until`; then it is half-open. Each time a probe fails the
  cool-down doubles, up to `cooldown_max_s`, so a dead endpoint gets a bounded trickle of calls.
- Half-open, ramping: `limit` calls may be in flight at once, starting at 1 (the probe). Every
  call that shows the endpoint up raises the limit by one, so the admitted share doubles per
  round trip (TCP's slow start); a FAILURE opens it again. It closes once the limit reaches
  `ramp_to` (the per-endpoint concurrency cap) or `ramp_s` after the first success.

A call is tagged with the breaker's `epoch` when admitted: a call that started before a state
change (a timeout begun while closed, ending while half-open) still counts in the windows but
does not drive the half-open decisions.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from enum import Enum, IntEnum


class CircuitState(IntEnum):
    """Also the value of the `circuit_state` gauge."""

    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2

    @property
    def label(self) -> str:
        return self.name.lower()


class Verdict(Enum):
    """What one call says about the endpoint."""

    SUCCESS = "success"  # 2xx
    REFUSED = "refused"  # the endpoint answered but the handler refused (3xx, most 4xx): it is up
    FAILURE = "failure"  # the endpoint looks unavailable: counts toward opening the circuit


# 408 Request Timeout and 429 Too Many Requests say "not now", like a 5xx.
_UNAVAILABLE_4XX = frozenset({408, 429})


def verdict_for(delivered: bool, status_code: int) -> Verdict:
    """The breaker's reading of one call: status 0 means no HTTP answer (timeout, connect, TLS)."""
    if delivered:
        return Verdict.SUCCESS
    if status_code == 0 or status_code >= 500 or status_code in _UNAVAILABLE_4XX:
        return Verdict.FAILURE
    return Verdict.REFUSED


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    window_s: float = 30.0
    min_calls: int = 20
    failure_rate: float = 0.5
    cooldown_s: float = 5.0
    cooldown_max_s: float = 300.0
    ramp_to: int = 50
    ramp_s: float = 5.0


class SlidingWindow:
    """Counts over the last `span_s` seconds in one-second buckets; O(1) amortised per call."""

    __slots__ = ("_buckets", "_span", "calls", "failures", "refused")

    def __init__(self, span_s: float) -> None:
        self._span = max(1, math.ceil(span_s))
        self._buckets: deque[list[int]] = deque()  # [second, calls, failures, refused]
        self.calls = 0
        self.failures = 0
        self.refused = 0

    def add(self, now: float, verdict: Verdict) -> None:
        second = int(now)
        self._evict(second)
        if self._buckets and self._buckets[-1][0] == second:
            bucket = self._buckets[-1]
        else:
            bucket = [second, 0, 0, 0]
            self._buckets.append(bucket)
        bucket[1] += 1
        self.calls += 1
        if verdict is Verdict.FAILURE:
            bucket[2] += 1
            self.failures += 1
        elif verdict is Verdict.REFUSED:
            bucket[3] += 1
            self.refused += 1

    def advance(self, now: float) -> SlidingWindow:
        """Drop buckets older than the span; returns self so reads can chain."""
        self._evict(int(now))
        return self

    def clear(self) -> None:
        self._buckets.clear()
        self.calls = self.failures = self.refused = 0

    def _evict(self, second: int) -> None:
        oldest = second - self._span
        buckets = self._buckets
        while buckets and buckets[0][0] <= oldest:
            _, calls, failures, refused = buckets.popleft()
            self.calls -= calls
            self.failures -= failures
            self.refused -= refused


class Breaker:
    """One endpoint's circuit. Times are the caller's monotonic clock in seconds."""

    __slots__ = (
        "_first_success_at",
        "_policy",
        "cooldown_s",
        "epoch",
        "limit",
        "open_until",
        "opened_at",
        "state",
        "trip_calls",
        "trip_failures",
        "window",
    )

    def __init__(self, policy: BreakerPolicy) -> None:
        self._policy = policy
        self.state = CircuitState.CLOSED
        self.window = SlidingWindow(policy.window_s)
        self.cooldown_s = policy.cooldown_s
        self.opened_at = 0.0
        self.open_until = 0.0
        self.limit = 1
        self.epoch = 0
        self._first_success_at: float | None = None
        self.trip_calls = 0  # what the window held when it last opened from closed
        self.trip_failures = 0

    def admits(self, now: float, in_flight: int) -> bool:
        """May one more call start now, with `in_flight` calls of this endpoint running?"""
        if self.state is CircuitState.CLOSED:
            return True
        if self.state is CircuitState.OPEN:
            if now < self.open_until:
                return False
            self._set(CircuitState.HALF_OPEN)
            self.limit = 1
            self._first_success_at = None
        return in_flight < self.limit

    def blocked(self, now: float) -> bool:
        """Open and still cooling down: nothing may start before `open_until`."""
        return self.state is CircuitState.OPEN and now < self.open_until

    def record(self, now: float, verdict: Verdict, epoch: int) -> CircuitState | None:
        """Count one finished call; returns the new state if this call changed it."""
        self.window.add(now, verdict)
        if epoch != self.epoch:
            return None  # began before the last state change: not a probe of this state
        if self.state is CircuitState.HALF_OPEN:
            if verdict is Verdict.FAILURE:
                self.cooldown_s = min(self.cooldown_s * 2, self._policy.cooldown_max_s)
                return self._open(now)
            self.limit += 1
            if self._first_success_at is None:
                self._first_success_at = now
            ramped = self.limit >= self._policy.ramp_to
            if ramped or now - self._first_success_at >= self._policy.ramp_s:
                self.cooldown_s = self._policy.cooldown_s
                self._set(CircuitState.CLOSED)
                return CircuitState.CLOSED
            return None
        if self.state is CircuitState.CLOSED and self._tripped(now):
            self.cooldown_s = self._policy.cooldown_s
            self.trip_calls, self.trip_failures = self.window.calls, self.window.failures
            return self._open(now)
        return None

    def settle(self, now: float) -> CircuitState | None:
        """Time-based change without a call: a quiet ramping endpoint closes `ramp_s` after
        its first success (otherwise it would look open until its next call)."""
        if (
            self.state is CircuitState.HALF_OPEN
            and self._first_success_at is not None
            and now - self._first_success_at >= self._policy.ramp_s
        ):
            self.cooldown_s = self._policy.cooldown_s
            self._set(CircuitState.CLOSED)
            return CircuitState.CLOSED
        return None

    def _tripped(self, now: float) -> bool:
        window = self.window.advance(now)
        return (
            window.calls >= self._policy.min_calls
            and window.failures >= self._policy.failure_rate * window.calls
        )

    def _open(self, now: float) -> CircuitState:
        self.opened_at = now
        self.open_until = now + self.cooldown_s
        self.window.clear()  # the half-open calls start a fresh count
        self._set(CircuitState.OPEN)
        return CircuitState.OPEN

    def _set(self, state: CircuitState) -> None:
        self.state = state
        self.epoch += 1
