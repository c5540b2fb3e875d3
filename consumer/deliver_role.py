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
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from consumer.admin import build_app, start_admin
from consumer.config import Settings
from consumer.endpoints import EndpointRegistry, load_file
from consumer.errors import KafkaError
from consumer.kafka_io import wait_for_broker
from consumer.metrics import Metrics
from consumer.registry_topic import RegistryFollower
from consumer.service import DeliveryService

log = logging.getLogger(__name__)

REGISTRY_LOAD_TIMEOUT_S = 60.0


@dataclass
class DeliverRole:
    settings: Settings
    metrics: Metrics
    registry: EndpointRegistry
    service: DeliveryService
    follower: RegistryFollower | None = None
    worker: int = 0
    admin: web.AppRunner | None = None

    async def readiness(self) -> dict[str, bool]:
        return {
            "broker": self.service.started,
            "assignment": self.service.assigned_once,
            "endpoints": self.registry.loaded,
        }

    def stop(self) -> None:
        self.service.stop()

    @property
    def stopping(self) -> bool:
        return self.service.stopping


def build_deliver(settings: Settings, metrics: Metrics | None = None, worker: int = 0) -> DeliverRole:
    """Everything the deliver role needs, ready to start; raises PerkamoError on bad set-up."""
    metrics = metrics or Metrics(enabled=settings.metrics_enabled)
    file_endpoints = load_file(settings.endpoints_file) if settings.endpoints_file else []
    registry = EndpointRegistry(file_endpoints)
    metrics.endpoints_loaded.set(registry.active_count())
    service = DeliveryService(settings, registry, metrics)
    follower = RegistryFollower(settings, registry, metrics)
    return DeliverRole(settings, metrics, registry, service, follower, worker)


async def serve_deliver(role: DeliverRole, install_signals: bool = True) -> None:
    """Run until SIGTERM/SIGINT (or role.stop()), then drain and return."""
    loop = asyncio.get_running_loop()
    if install_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, role.stop)
    await asyncio.to_thread(wait_for_broker, role.settings, 30.0)
    host, port = role.settings.deliver_host_port(role.worker)
    role.admin = await start_admin(
        build_app(role.metrics, role.readiness, health=role.service.endpoint_health), host, port
    )
    try:
        if role.follower is not None:
            role.follower.start()
            await wait_for_registry(role.follower, lambda: role.stopping)
        await role.service.run()
    finally:
        if role.follower is not None:
            await asyncio.to_thread(role.follower.stop)
        await role.admin.cleanup()


async def wait_for_registry(follower: RegistryFollower, stopping: Callable[[], bool]) -> None:
    """Deliver nothing before the registry topic was read to its end (docs/architecture.md)."""
    deadline = time.monotonic() + REGISTRY_LOAD_TIMEOUT_S
    while not await asyncio.to_thread(follower.wait_loaded, 0.5):
        if stopping():
            return
        if time.monotonic() > deadline:
            raise KafkaError(
                f"endpoint registry topic not read to its end within {REGISTRY_LOAD_TIMEOUT_S:.0f}s"
            )
