"""The deliver role: events, retry tiers and held deliveries in; HTTP calls and records out.

It holds no store and never imports the history modules, so no ClickHouse engine is in its
address space: a ClickHouse outage does not stop deliveries, and any number of deliver
processes can run on one machine (`perkamo-webhooks run --role deliver --workers N`).
Its admin listener (PERKAMO_DELIVER_ADMIN_LISTEN, port + worker index) serves /metrics,
/healthz, /readyz and this process's view of endpoint health.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

from aiohttp import web

from consumer import gctune, tracing
from consumer.admin import build_app, start_admin
from consumer.config import Settings
from consumer.deliver_context import build_context
from consumer.endpoints import EndpointRegistry, load_file
from consumer.kafka_admin import BrokerWatch
from consumer.kafka_io import use_settings
from consumer.kafka_topics import wait_for_broker
from consumer.metrics import Metrics
from consumer.models import Endpoint
from consumer.registry_topic import RegistryFollower
from consumer.service import DeliveryService
from consumer.topic_check import check_topics

log = logging.getLogger(__name__)



@dataclass
class DeliverRole:
    settings: Settings
    metrics: Metrics
    registry: EndpointRegistry
    service: DeliveryService
    follower: RegistryFollower | None = None
    worker: int = 0
    admin: web.AppRunner | None = None
    watch: BrokerWatch | None = None  # a broker round trip every few seconds (readiness, lag)
    # Freeze the start-up heap and raise the GC thresholds (consumer.gctune); off where several
    # roles share one process (tests).
    tune_gc: bool = True

    async def readiness(self) -> dict[str, bool]:
        """Not ready while Kafka does not answer, or while a write to it keeps failing (the
        offsets stay uncommitted meanwhile: docs/operations.md, "While Kafka is unreachable")."""
        return {
            "broker": self.service.started and self.watch is not None and self.watch.reachable,
            "assignment": self.service.assigned_once,
            "endpoints": self.registry.loaded,
            "kafka_writes": not self.service.writes_blocked,
        }

    def stop(self) -> None:
        self.service.stop()

    @property
    def stopping(self) -> bool:
        return self.service.stopping


def build_deliver(settings: Settings, metrics: Metrics | None = None, worker: int = 0) -> DeliverRole:
    """Everything the deliver role needs, ready to start; raises PerkamoError on bad set-up."""
    use_settings(settings)  # every Kafka client made from the bootstrap string gets PERKAMO_KAFKA_*
    if metrics is None:
        metrics = Metrics(enabled=settings.metrics_enabled)
        gctune.watch(metrics)
    metrics.limit_labels(settings.metrics_max_label_values, settings.metrics_event_types)
    file_endpoints = load_file(settings.endpoints_file) if settings.endpoints_file else []
    registry = EndpointRegistry(file_endpoints)
    for space in registry.spaces():
        metrics.spaces.add_known(space)
    metrics.endpoints_loaded.set(registry.active_count())
    service = DeliveryService(build_context(settings, registry, metrics))
    follower = RegistryFollower(settings, registry, metrics)
    return DeliverRole(settings, metrics, registry, service, follower, worker)


async def serve_deliver(role: DeliverRole, install_signals: bool = True) -> None:
    """Run until SIGTERM/SIGINT (or role.stop()), then drain and return."""
    loop = asyncio.get_running_loop()
    if install_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, role.stop)
    await asyncio.to_thread(wait_for_broker, role.settings, 30.0)
    await asyncio.to_thread(check_topics, role.settings, "deliver")  # ConfigError: exit 78

    # Registry changes arrive on the follower's thread; per-endpoint state lives on the loop.
    def on_change(space: str, before: Endpoint | None, after: Endpoint | None) -> None:
        loop.call_soon_threadsafe(endpoint_changed, role, space, before, after)

    role.registry.add_listener(on_change)
    host, port = role.settings.deliver_host_port(role.worker)
    app = build_app(role.metrics, role.readiness, role.settings, health=role.service.endpoint_health)
    role.admin = await start_admin(app, host, port)
    role.watch = watch = BrokerWatch(role.settings)
    watch.start()
    role.metrics.kafka_reachable.set_function(lambda: float(watch.reachable))
    try:
        if role.follower is not None:
            role.follower.start()
            await role.follower.until_loaded(lambda: role.stopping)
        if role.tune_gc:
            gctune.tune()
        await role.service.run()
    finally:
        if role.follower is not None:
            await asyncio.to_thread(role.follower.stop)
        await role.admin.cleanup()
        await asyncio.to_thread(watch.stop)
        await asyncio.to_thread(tracing.current().flush)  # the batch processor's last spans


def endpoint_changed(
    role: DeliverRole, space: str, before: Endpoint | None, after: Endpoint | None
) -> None:
    """Keep per-endpoint state bounded: what belonged to an endpoint that went away is dropped
    (its gate: breaker, health and waiters; the Deliverer's per-host entry; the Space's series).
    A changed URL gets a fresh gate on its next delivery (consumer.gate.Gates.get)."""
    if after is not None:
        role.metrics.spaces.add_known(space)
    if before is None:
        return
    gone = after is None or after.id != before.id or not after.active
    if gone:
        role.service.gates.forget(before.id)
    if gone or (after is not None and after.host != before.host):
        role.service.ctx.deliverer.forget(before.host)
    if after is None or not after.active:
        role.metrics.forget_space(space)
