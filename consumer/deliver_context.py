"""What the deliver role's parts share, built once before the loop starts and handed down
(as quix-streams' ProcessingContext and svix's WorkerContext): the settings, the endpoint
registry, the metrics, the one Kafka producer, the HTTP deliverer, the endpoint gates with
their circuit reporter, and the count of deliveries in flight. Nothing is fetched back up
through getters or callbacks."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from consumer.breaker import BreakerPolicy
from consumer.circuits import CircuitReporter
from consumer.config import Settings
from consumer.delivery import Deliverer
from consumer.endpoints import EndpointRegistry
from consumer.gate import GateLimits, Gates
from consumer.health import HealthPolicy
from consumer.kafka_io import AsyncProducer
from consumer.metrics import Metrics


class InFlight:
    """Deliveries taken from Kafka and not finished, against PERKAMO_MAX_IN_FLIGHT. The loop
    takes a place per message and gives it back when the message is done; a held delivery
    gives its place back while it waits for its circuit (consumer.pipeline)."""

    def __init__(self, most: int) -> None:
        self.most = most
        self.count = 0
        self._room = asyncio.Event()  # set when a place frees

    @property
    def room(self) -> int:
        return self.most - self.count

    def take(self) -> None:
        self.count += 1

    def give(self) -> None:
        self.count -= 1
        self._room.set()

    async def wait_for_room(self, timeout: float) -> None:
        """Until a place frees, or `timeout` seconds."""
        self._room.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._room.wait(), timeout=timeout)


@dataclass(frozen=True, slots=True)
class DeliverContext:
    settings: Settings
    registry: EndpointRegistry
    metrics: Metrics
    producer: AsyncProducer
    deliverer: Deliverer
    gates: Gates
    reporter: CircuitReporter
    in_flight: InFlight


def gates_for(settings: Settings, reporter: CircuitReporter | None = None) -> Gates:
    """The endpoint gates with the breaker, health and cap settings."""
    return Gates(
        BreakerPolicy(
            window_s=settings.breaker_window_s,
            min_calls=settings.breaker_min_calls,
            failure_rate=settings.breaker_failure_rate,
            cooldown_s=settings.breaker_cooldown_s,
            cooldown_max_s=settings.breaker_cooldown_max_s,
            ramp_to=settings.max_in_flight_per_endpoint,
            ramp_s=settings.breaker_ramp_s,
        ),
        HealthPolicy(
            window_s=settings.health_window_s,
            degraded_rate=settings.health_degraded_rate,
            failing_rate=settings.breaker_failure_rate,
        ),
        GateLimits(
            cap=settings.max_in_flight_per_endpoint,
            queue_cap=2 * settings.max_in_flight_per_endpoint,
            slow_after_s=min(1.0, settings.delivery_timeout_s / 2),
        ),
        on_change=reporter.changed if reporter is not None else None,
    )


def build_context(settings: Settings, registry: EndpointRegistry, metrics: Metrics) -> DeliverContext:
    """Every shared part, ready before the loop: the producer's thread starts here (its
    librdkafka connections open on the first publish)."""
    producer = AsyncProducer(settings)
    reporter = CircuitReporter(metrics, producer)
    return DeliverContext(
        settings=settings,
        registry=registry,
        metrics=metrics,
        producer=producer,
        deliverer=Deliverer(settings, metrics),
        gates=gates_for(settings, reporter),
        reporter=reporter,
        in_flight=InFlight(settings.max_in_flight),
    )
