"""Assembles the running service: settings -> store, registry, delivery loop, admin server."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

from aiohttp import web

from consumer.admin import build_app, start_admin
from consumer.config import Settings
from consumer.endpoints import EndpointRegistry, load_file
from consumer.history import HistoryStore
from consumer.kafka_io import wait_for_broker
from consumer.metrics import Metrics
from consumer.service import DeliveryService

log = logging.getLogger(__name__)


@dataclass
class App:
    settings: Settings
    metrics: Metrics
    store: HistoryStore
    registry: EndpointRegistry
    service: DeliveryService
    admin: web.AppRunner | None = None

    async def readiness(self) -> dict[str, bool]:
        return {
            "broker": self.service.started,
            "assignment": self.service.assigned_once,
            "endpoints": self.registry.loaded,
            "history": self.service.writer.healthy,
        }


def build(settings: Settings, store: HistoryStore | None = None, metrics: Metrics | None = None) -> App:
    """Everything `run` needs, ready to start; raises PerkamoError subclasses on bad set-up."""
    metrics = metrics or Metrics(enabled=settings.metrics_enabled)
    store = store or HistoryStore(settings.history_dsn_resolved)
    store.migrate(settings.history_ttl_days)
    file_endpoints = load_file(settings.endpoints_file) if settings.endpoints_file else []
    registry = EndpointRegistry(file_endpoints)
    registry.loaded = True  # no registry topic follower yet: the file is all there is
    metrics.endpoints_loaded.set(registry.active_count())
    service = DeliveryService(settings, registry, store, metrics)
    return App(settings, metrics, store, registry, service)


async def serve(app: App, install_signals: bool = True) -> None:
    """Run until SIGTERM/SIGINT (or app.service.stop()), then drain and return."""
    loop = asyncio.get_running_loop()
    if install_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, app.service.stop)
    await asyncio.to_thread(wait_for_broker, app.settings.kafka_bootstrap_servers, 30.0)
    host, port = app.settings.admin_host_port
    app.admin = await start_admin(build_app(app.metrics, app.readiness), host, port)
    try:
        await app.service.run()
    finally:
        await app.admin.cleanup()
