"""Assembles the running service: settings -> store, registry, delivery loop, admin server."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from aiohttp import web

from consumer.admin import build_app, start_admin
from consumer.config import Settings
from consumer.endpoints import EndpointRegistry, load_file
from consumer.errors import KafkaError
from consumer.history import HistoryStore
from consumer.kafka_io import use_settings, wait_for_broker
from consumer.metrics import Metrics
from consumer.models import Endpoint
from consumer.registry_publish import Receipt, publish_endpoint_record
from consumer.registry_topic import RegistryFollower
from consumer.republish import Republisher
from consumer.service import DeliveryService

log = logging.getLogger(__name__)

REGISTRY_LOAD_TIMEOUT_S = 60.0


@dataclass
class App:
    settings: Settings
    metrics: Metrics
    store: HistoryStore
    registry: EndpointRegistry
    service: DeliveryService
    follower: RegistryFollower | None = None
    admin: web.AppRunner | None = None

    async def readiness(self) -> dict[str, bool]:
        return {
            "broker": self.service.started,
            "assignment": self.service.assigned_once,
            "endpoints": self.registry.loaded,
            "history": self.service.writer.healthy,
        }

    # What the history API and the console use (consumer.console.ConsoleContext) -------------

    @property
    def reader(self) -> HistoryStore:
        return self.store

    @property
    def endpoints(self) -> EndpointRegistry:
        return self.registry

    @cached_property
    def republisher(self) -> Republisher:
        """One per process: the API and the console share its double-work guard."""
        registry, service = self.registry, self.service
        return Republisher(
            self.store, self.settings.events_topics[0], lambda: service.producer, self.metrics,
            has_endpoint=lambda space: registry.get(space) is not None,
        )

    async def publish_endpoint(self, space: str, record: Mapping[str, Any] | None) -> Receipt:
        """Publish to the registry topic like `endpoints set|remove` (the follower applies it)."""
        return await publish_endpoint_record(self.settings.kafka_bootstrap_servers, space, record)

    def endpoint_health(self, space: str) -> Mapping[str, Any] | None:
        """The console's view of one Space's endpoint health (consumer.health)."""
        if self.registry.get(space) is None:
            return None
        return self.service.endpoint_health().get(space) or {"state": "healthy", "circuit": "closed"}

    def endpoints_health(self) -> dict[str, dict[str, Any]]:
        return self.service.endpoint_health()


def build(settings: Settings, store: HistoryStore | None = None, metrics: Metrics | None = None) -> App:
    """Everything `run` needs, ready to start; raises PerkamoError subclasses on bad set-up."""
    use_settings(settings)  # every Kafka client made from the bootstrap string gets PERKAMO_KAFKA_*
    metrics = metrics or Metrics(enabled=settings.metrics_enabled)
    metrics.limit_labels(settings.metrics_max_label_values, settings.metrics_event_types)
    store = store or HistoryStore.from_settings(settings)
    store.migrate(settings.history_ttl_days)
    file_endpoints = load_file(settings.endpoints_file) if settings.endpoints_file else []
    registry = EndpointRegistry(file_endpoints)
    for space in registry.spaces():
        metrics.spaces.add_known(space)
    metrics.endpoints_loaded.set(registry.active_count())
    service = DeliveryService(settings, registry, store, metrics)
    # Follows perkamo.webhooks.endpoints; registry.loaded stays False until it is read to its end.
    follower = RegistryFollower(settings, registry, metrics)
    return App(settings, metrics, store, registry, service, follower=follower)


async def serve(app: App, install_signals: bool = True) -> None:
    """Run until SIGTERM/SIGINT (or app.service.stop()), then drain and return."""
    loop = asyncio.get_running_loop()
    if install_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, app.service.stop)
    await asyncio.to_thread(wait_for_broker, app.settings, 30.0)
    # Registry changes arrive on the follower's thread; per-endpoint state lives on the loop.
    def on_change(space: str, before: Endpoint | None, after: Endpoint | None) -> None:
        loop.call_soon_threadsafe(endpoint_changed, app, space, before, after)

    app.registry.add_listener(on_change)
    host, port = app.settings.admin_host_port
    app.admin = await start_admin(build_app(app.metrics, app.readiness, app, console=app), host, port)
    try:
        if app.follower is not None:
            app.follower.start()
            await _wait_for_registry(app)
        await app.service.run()
    finally:
        if app.follower is not None:
            await asyncio.to_thread(app.follower.stop)
        await app.admin.cleanup()


def endpoint_changed(
    app: App, space: str, before: Endpoint | None, after: Endpoint | None
) -> None:
    """Keep per-endpoint state bounded: what belonged to an endpoint that went away is dropped
    (its gate: breaker, health and waiters; the Deliverer's per-host entry; the Space's series).
    A changed URL gets a fresh gate on its next delivery (consumer.gate.Gates.get)."""
    if after is not None:
        app.metrics.spaces.add_known(space)
    if before is None:
        return
    gone = after is None or after.id != before.id or not after.active
    if gone:
        app.service.gates.forget(before.id)
    if gone or (after is not None and after.host != before.host):
        app.service.deliverer.forget(before.host)
    if after is None or not after.active:
        app.metrics.forget_space(space)


async def _wait_for_registry(app: App) -> None:
    """Deliver nothing before the registry topic was read to its end (DESIGN §5)."""
    assert app.follower is not None
    deadline = time.monotonic() + REGISTRY_LOAD_TIMEOUT_S
    while not await asyncio.to_thread(app.follower.wait_loaded, 0.5):
        if app.service.stopping:
            return
        if time.monotonic() > deadline:
            raise KafkaError(
                f"endpoint registry topic not read to its end within {REGISTRY_LOAD_TIMEOUT_S:.0f}s"
            )
