"""Per-endpoint circuit breaker: stop calling an endpoint that keeps failing (DESIGN §6).

Closed: calls pass. After `failures` consecutive failures it opens: calls are refused (the
delivery moves to its next tier without an HTTP call) until `cooldown_s` has passed; then it
is half-open: one probe call passes. The probe's success closes it; its failure opens it again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

CLOSED, OPEN, HALF_OPEN = 0, 1, 2


@dataclass(slots=True)
class _State:
    state: int = CLOSED
    consecutive_failures: int = 0
    opened_at: float = 0.0
    probe_in_flight: bool = False


class CircuitBreakers:
    """One breaker per endpoint id."""

    def __init__(
        self,
        failures: int,
        cooldown_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, int], None] | None = None,
    ) -> None:
        self._failures = failures
        self._cooldown_s = cooldown_s
        self._clock = clock
        self._on_change = on_change
        self._states: dict[str, _State] = {}

    def state(self, key: str) -> int:
        return self._states[key].state if key in self._states else CLOSED

    def is_open(self, key: str) -> bool:
        """Open and still cooling down (no probe due yet); does not change the state."""
        st = self._states.get(key)
        return st is not None and st.state == OPEN and self._clock() - st.opened_at < self._cooldown_s

    def failing(self, key: str) -> bool:
        """The endpoint's last call failed (or its circuit is not closed)."""
        st = self._states.get(key)
        return st is not None and (st.consecutive_failures > 0 or st.state != CLOSED)

    def allow(self, key: str) -> bool:
        """May a call to this endpoint go out now? (Takes the half-open probe slot if so.)"""
        st = self._states.get(key)
        if st is None or st.state == CLOSED:
            return True
        if st.state == OPEN and self._clock() - st.opened_at >= self._cooldown_s:
            self._set(key, st, HALF_OPEN)
        if st.state == HALF_OPEN and not st.probe_in_flight:
            st.probe_in_flight = True
            return True
        return False

    def record(self, key: str, success: bool) -> None:
        """Record the result of a call that `allow` let through."""
        st = self._states.setdefault(key, _State())
        st.probe_in_flight = False
        if success:
            st.consecutive_failures = 0
            if st.state != CLOSED:
                self._set(key, st, CLOSED)
            return
        st.consecutive_failures += 1
        if st.state == HALF_OPEN or st.consecutive_failures >= self._failures:
            st.opened_at = self._clock()
            if st.state != OPEN:
                self._set(key, st, OPEN)

    def _set(self, key: str, st: _State, state: int) -> None:
        st.state = state
        if self._on_change:
            self._on_change(key, state)
