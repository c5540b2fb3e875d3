"""The history role: attempt records from Kafka into ClickHouse, and everything that reads them.

It consumes `perkamo.webhooks.attempts` in its own group (consumer.ingest) and serves, on
PERKAMO_ADMIN_LISTEN, the history API, resend and replay (re-published through Kafka with its
own producer), the endpoints' health across every deliver process (from the records), and
/metrics, /healthz, /readyz. With the embedded store (chdb://) one history process per data
directory may run; with a ClickHouse server several may share the topic.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from aiohttp import web

from consumer import constants as c
from consumer.admin import start_admin
from consumer.breaker import CircuitState
from consumer.config import Settings
from consumer.console import mount as mount_console
from consumer.endpoints import EndpointRegistry, load_file
from consumer.health import HealthBook, HealthPolicy, HealthState
from consumer.history import HistoryStore
from consumer.history_api import history_app
from consumer.ingest import HistoryIngest
from consumer.kafka_admin import BrokerWatch
from consumer.kafka_io import AsyncProducer, use_settings
from consumer.kafka_topics import wait_for_broker
from consumer.metrics import Metrics
from consumer.read_pool import ReadPool
from consumer.registry_publish import Receipt, publish_endpoint_record
from consumer.registry_topic import RegistryFollower
from consumer.republish import Republisher
from consumer.topic_check import check_topics

log = logging.getLogger(__name__)


@dataclass
class HistoryRole:
    settings: Settings
    metrics: Metrics
    store: HistoryStore
    registry: EndpointRegistry
    ingest: HistoryIngest
    health: HealthBook
    producer: AsyncProducer  # resends and replays: built before the loop, closed at the end
    follower: RegistryFollower | None = None
    admin: web.AppRunner | None = None
    watch: BrokerWatch | None = None  # a broker round trip every few seconds (readiness, lag)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def readiness(self) -> dict[str, bool]:
        return {
            "broker": self.watch is not None and self.watch.reachable,
            "assignment": self.ingest.assigned_once,
            "endpoints": self.registry.loaded,
            "history": self.ingest.healthy and self.ingest.running,
        }

    # What the history API (consumer.history_api.AdminContext) and the console
    # (consumer.console.ConsoleContext) use ------------------------------------------------------

    @property
    def reader(self) -> HistoryStore:
        return self.store

    @property
    def endpoints(self) -> EndpointRegistry:
        return self.registry

    @cached_property
    def republisher(self) -> Republisher:
        """One per process: the API and the console share its double-work guard."""
        registry = self.registry
        return Republisher(
            self.store, c.REDELIVER_TOPIC, self.producer, self.metrics,
            has_endpoint=lambda space: registry.get(space) is not None,
            originals=self.settings,  # where a cut body's original is read back from
        )

    async def publish_endpoint(self, space: str, record: Mapping[str, Any] | None) -> Receipt:
        """Publish to the registry topic like `endpoints set|remove` (the followers apply it)."""
        return await publish_endpoint_record(self.settings.kafka_bootstrap_servers, space, record)

    def endpoints_health(self) -> dict[str, dict[str, Any]]:
        """Per Space, from the attempt records of every deliver process (consumer.health)."""
        return self.health.snapshot()

    def endpoint_health(self, space: str) -> Mapping[str, Any] | None:
        if self.registry.get(space) is None:
            return None
        unseen = {"state": HealthState.HEALTHY.label, "circuit": CircuitState.CLOSED.label}
        return self.health.snapshot().get(space) or unseen

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()


def build_history(
    settings: Settings, store: HistoryStore | None = None, metrics: Metrics | None = None
) -> HistoryRole:
    """Everything the history role needs, ready to start; migrates the schema."""
    use_settings(settings)  # every Kafka client made from the bootstrap string gets PERKAMO_KAFKA_*
    metrics = metrics or Metrics(enabled=settings.metrics_enabled)
    metrics.limit_labels(settings.metrics_max_label_values, settings.metrics_event_types)
    store = store or HistoryStore.from_settings(settings)
    store.migrate(settings.history_ttl_days)
    file_endpoints = load_file(settings.endpoints_file) if settings.endpoints_file else []
    registry = EndpointRegistry(file_endpoints)
    health = HealthBook(HealthPolicy(window_s=settings.health_window_s,
                                     degraded_rate=settings.health_degraded_rate,
                                     failing_rate=settings.breaker_failure_rate))
    ingest = HistoryIngest(settings, store.insert, metrics, on_rows=health.observe)
    registry.add_listener(health.endpoint_changed)  # health and certificates of removed endpoints go
    follower = RegistryFollower(settings, registry, metrics)
    return HistoryRole(settings, metrics, store, registry, ingest, health, AsyncProducer(settings), follower)


async def serve_history(role: HistoryRole, install_signals: bool = True) -> None:
    """Run until SIGTERM/SIGINT (or role.stop()), then insert what is gathered and return."""
    loop = asyncio.get_running_loop()
    if install_signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, role.stop)
    await asyncio.to_thread(wait_for_broker, role.settings, 30.0)
    await asyncio.to_thread(check_topics, role.settings, "history")  # ConfigError: exit 78
    host, port = role.settings.admin_host_port
    reads = ReadPool(role.settings.history_max_concurrent_queries)  # the API's and the console's
    app = history_app(role.metrics, role.readiness, role, health=role.endpoints_health, reads=reads)
    mount_console(app, role, reads=reads)
    role.admin = await start_admin(app, host, port)
    role.watch = watch = BrokerWatch(role.settings)
    watch.start()
    role.metrics.kafka_reachable.set_function(lambda: float(watch.reachable))
    try:
        role.ingest.start()
        if role.follower is not None:
            role.follower.start()
            await role.follower.until_loaded(lambda: role.stopping)
        await role._stop.wait()
    finally:
        log.info("stopping: inserting what is gathered")
        await asyncio.to_thread(role.ingest.stop, role.settings.drain_timeout_s + 5)
        if role.follower is not None:
            await asyncio.to_thread(role.follower.stop)
        await role.admin.cleanup()
        await asyncio.to_thread(role.producer.close, 10.0)
        await asyncio.to_thread(watch.stop)
        log.info("stopped")
