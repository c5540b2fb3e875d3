"""Endpoint health: what operators and the Space's developers see of an endpoint (in memory, no I/O).

Per endpoint, from the calls this process made: a state, the failure rate over the last
`window_s` seconds, the last success and the last failure (wall-clock times), and how many
deliveries are held. The states, worst last:

- healthy: no failure in the window (or too few to matter);
- degraded: some calls fail (at least `degraded_rate` of them);
- failing: most fail (at least the breaker's failure rate), or the last
  `FAILING_STREAK` calls all failed, but the circuit is still closed (too few calls to trip);
- circuit_open: the circuit is open or ramping back up (half-open).

Here any call that did not deliver is a failure, 4xx included: the breaker ignores a
refusing handler (the endpoint is up), but the Space's developers need to see it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum
from typing import Any

from consumer.breaker import CircuitState, SlidingWindow, Verdict
from consumer.constants import STATUS_DELIVERED, STATUS_HELD, HoldReason
from consumer.models import AttemptRow, Endpoint

FAILING_STREAK = 3
# Below this many calls in the window a failure rate says little: only the streak counts.
MIN_CALLS_FOR_RATE = 5


class HealthState(IntEnum):
    """Also the value of the `endpoint_health` gauge."""

    HEALTHY = 0
    DEGRADED = 1
    FAILING = 2
    CIRCUIT_OPEN = 3

    @property
    def label(self) -> str:
        return self.name.lower()


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    window_s: float = 300.0
    degraded_rate: float = 0.05
    failing_rate: float = 0.5


@dataclass(slots=True)
class EndpointHealth:
    """The running record of one endpoint's calls; `snapshot()` is what is shown."""

    policy: HealthPolicy
    window: SlidingWindow = field(init=False)
    streak: int = 0  # consecutive failed calls
    last_success_at: float | None = None  # epoch seconds
    last_failure_at: float | None = None
    last_error_kind: str = ""
    # The endpoint certificate's notAfter (unix time) as last seen on a new TLS connection, and
    # the time of the attempt that saw it (records arrive out of order: the latest wins).
    cert_not_after: float | None = None
    cert_seen_at: float = 0.0

    def __post_init__(self) -> None:
        self.window = SlidingWindow(self.policy.window_s)

    def record(self, now: float, wall: float, verdict: Verdict, error_kind: str = "") -> None:
        # Health counts every undelivered call as failed: give the window FAILURE for both.
        delivered = verdict is Verdict.SUCCESS
        self.window.add(now, Verdict.SUCCESS if delivered else Verdict.FAILURE)
        if delivered:
            self.streak = 0
            self.last_success_at = wall
        else:
            self.streak += 1
            self.last_failure_at = wall
            self.last_error_kind = error_kind

    def saw_certificate(self, not_after: float, at: float = 0.0) -> None:
        if at >= self.cert_seen_at:
            self.cert_not_after, self.cert_seen_at = not_after, at

    def failure_rate(self, now: float) -> float:
        window = self.window.advance(now)
        return window.failures / window.calls if window.calls else 0.0

    def state(self, now: float, circuit: CircuitState) -> HealthState:
        if circuit is not CircuitState.CLOSED:
            return HealthState.CIRCUIT_OPEN
        window = self.window.advance(now)
        rate = window.failures / window.calls if window.calls else 0.0
        enough = window.calls >= MIN_CALLS_FOR_RATE
        if self.streak >= FAILING_STREAK or (enough and rate >= self.policy.failing_rate):
            return HealthState.FAILING
        if window.failures and (not enough or rate >= self.policy.degraded_rate):
            return HealthState.DEGRADED
        return HealthState.HEALTHY

    def snapshot(self, now: float, circuit: CircuitState, held: int) -> dict[str, Any]:
        window = self.window.advance(now)
        return {
            "state": self.state(now, circuit).label,
            "circuit": circuit.label,
            "failure_rate": round(window.failures / window.calls, 4) if window.calls else 0.0,
            "calls": window.calls,
            "window_s": self.policy.window_s,
            "last_success_at": _iso(self.last_success_at),
            "last_failure_at": _iso(self.last_failure_at),
            "last_error_kind": self.last_error_kind,
            "held": held,
            "cert_not_after": _iso(self.cert_not_after),
            "cert_expires_in_s": (None if self.cert_not_after is None
                                  else round(self.cert_not_after - time.time())),
        }


class HealthBook:
    """Endpoint health from attempt records: the history role's view across every deliver
    process (each process's own view is in its gauges and its /api/v1/endpoints/health).

    Fed by the history role's writer thread; read by the admin API: a lock guards it. Time
    is the records' `attempted_at`. The circuit counts as open while deliveries of the Space
    are held for it (a hold record newer than any attempt of that delivery).
    """

    def __init__(self, policy: HealthPolicy) -> None:
        self._policy = policy
        self._lock = threading.Lock()
        self._health: dict[str, EndpointHealth] = {}
        self._held: dict[str, dict[str, str]] = {}  # space -> delivery id -> hold reason
        self._latest = 0.0

    def observe(self, rows: Iterable[AttemptRow]) -> None:
        with self._lock:
            for row in rows:
                self._observe(row)

    def _observe(self, row: AttemptRow) -> None:
        at = row.attempted_at.timestamp()
        self._latest = max(self._latest, at)
        held = self._held.setdefault(row.space_slug, {})
        if row.attempt == 0:
            if row.status == STATUS_HELD:
                held[row.delivery_id] = row.error_kind
            else:
                held.pop(row.delivery_id, None)
            return
        held.pop(row.delivery_id, None)
        health = self._health.get(row.space_slug)
        if health is None:
            health = self._health[row.space_slug] = EndpointHealth(self._policy)
        if row.cert_not_after is not None:
            health.saw_certificate(row.cert_not_after.timestamp(), at)
        verdict = Verdict.SUCCESS if row.status == STATUS_DELIVERED else Verdict.FAILURE
        health.record(at, at, verdict, row.error_kind)

    def forget(self, space: str) -> None:
        with self._lock:
            self._health.pop(space, None)
            self._held.pop(space, None)

    def endpoint_changed(self, space: str, before: Endpoint | None, after: Endpoint | None) -> None:
        """The registry's listener: what was kept of an endpoint that went away is dropped; a
        changed URL forgets the old one's certificate (the next new connection tells)."""
        if before is None:
            return
        if after is None or after.id != before.id or not after.active:
            self.forget(space)
        elif after.url != before.url:
            with self._lock:
                health = self._health.get(space)
                if health is not None:
                    health.cert_not_after, health.cert_seen_at = None, 0.0

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            now = max(self._latest, time.time())
            out = {}
            for space in self._health.keys() | self._held.keys():
                held = self._held.get(space, {})
                open_ = any(reason == HoldReason.CIRCUIT_OPEN for reason in held.values())
                circuit = CircuitState.OPEN if open_ else CircuitState.CLOSED
                health = self._health.get(space) or EndpointHealth(self._policy)
                out[space] = health.snapshot(now, circuit, len(held))
            return out
