"""What the deliver role makes of its endpoint gates: circuit changes and health, made visible.

A circuit change is logged and published to `perkamo.webhooks.operational` (opened from
closed, and closed; failed probes in between are not news). About once a second `refresh()`
applies time-based circuit changes and copies every endpoint's health into the per-Space
gauges. (A gate whose endpoint went away is closed by the registry listener,
consumer.deliver_role.endpoint_changed: its held deliveries look the endpoint up again.)
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from consumer import constants as c
from consumer import operational
from consumer.breaker import CircuitState
from consumer.gate import EndpointGate, Gates
from consumer.kafka_io import AsyncProducer
from consumer.metrics import Metrics

log = logging.getLogger(__name__)


class CircuitReporter:
    """The gates' state listener: logs circuit changes, publishes the operational records
    (not tied to an offset: a failure is logged, not retried), and copies health to metrics."""

    def __init__(self, metrics: Metrics, producer: AsyncProducer) -> None:
        self._metrics = metrics
        self._producer = producer
        self._background: set[asyncio.Task[None]] = set()

    def _emit(self, kind: str, key: str, record: bytes) -> None:
        async def publish() -> None:
            try:
                await self._producer.publish(c.OPERATIONAL_TOPIC, record, key)
                self._metrics.operational_events.labels(kind).inc()
            except Exception as exc:
                log.warning("operational event %s for space %s not published: %s", kind, key, exc)

        task = asyncio.create_task(publish())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self, timeout: float) -> None:
        """Wait (up to `timeout`) for the operational records still being published."""
        if self._background:
            await asyncio.wait(self._background, timeout=timeout)

    def changed(self, gate: EndpointGate, before: CircuitState, after: CircuitState) -> None:
        """The gates' state listener."""
        host = gate.endpoint.host
        self._metrics.circuit_state.labels(gate.space).set(int(after))
        breaker = gate.breaker
        if before is CircuitState.CLOSED and after is CircuitState.OPEN:
            calls = breaker.trip_calls
            rate = breaker.trip_failures / calls if calls else 0.0
            log.warning("circuit for space %s opened: %d calls, %.0f%% found it unavailable; next "
                        "probe in %.0fs", gate.space, calls, rate * 100, breaker.cooldown_s)
            record = operational.circuit_opened(
                gate.space, gate.key, host, time.time(),
                failure_rate=rate, calls=calls, cooldown_s=breaker.cooldown_s,
            )
            self._emit(operational.CIRCUIT_OPENED, gate.space, record)
        elif after is CircuitState.CLOSED:
            open_for = asyncio.get_running_loop().time() - breaker.opened_at
            log.warning("circuit for space %s closed after %.1fs", gate.space, open_for)
            record = operational.circuit_closed(gate.space, gate.key, host, time.time(), open_for_s=open_for)
            self._emit(operational.CIRCUIT_CLOSED, gate.space, record)
        else:
            log.info("circuit for space %s is now %s", gate.space, after.label)

    def refresh(self, gates: Gates) -> None:
        metrics = self._metrics
        most = 0
        now = asyncio.get_running_loop().time()
        wall = time.time()
        for gate in gates:
            gate.tick()
            health, space = gate.health, gate.space
            metrics.circuit_state.labels(space).set(int(gate.circuit))
            metrics.endpoint_health.labels(space).set(int(health.state(now, gate.circuit)))
            metrics.endpoint_failure_ratio.labels(space).set(health.failure_rate(now))
            metrics.endpoint_last_success.labels(space).set(health.last_success_at or 0)
            metrics.endpoint_last_failure.labels(space).set(health.last_failure_at or 0)
            metrics.held_deliveries.labels(space).set(gate.held)
            if health.cert_not_after is not None:
                metrics.endpoint_cert_expiry.labels(space).set(health.cert_not_after - wall)
            most = max(most, gate.in_flight)
        metrics.in_flight_max_per_endpoint.set(most)


def health_of(gates: Gates) -> dict[str, dict[str, Any]]:
    """Per Space: its endpoint's health as this process sees it (the admin API's answer)."""
    return {gate.space: gate.snapshot() for gate in gates}
