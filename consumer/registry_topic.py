"""Follows the compacted registry topic `perkamo.webhooks.endpoints` into the EndpointRegistry.

The consumer reads the topic to its end before it delivers, then follows updates live
(docs/architecture.md, endpoints). Every process reads the whole topic itself, so the reader
joins no consumer group and commits nothing: it assigns every partition from the beginning (a
unique group.id only because librdkafka requires one; with no subscribe() and no commit, no
group is created).

"Read to its end" means: every partition reached the high watermark it had when it was
assigned (librdkafka's partition-EOF event, which also covers offsets left as gaps by
compaction or transaction markers). A missing topic means "no topic records": the registry
counts as loaded (file only) and the follower keeps checking for the topic.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Final

from consumer.config import Settings
from consumer.constants import ENDPOINTS_TOPIC
from consumer.endpoints import EndpointRegistry
from consumer.errors import KafkaFailure, PerkamoError
from consumer.kafka_io import Message
from consumer.kafka_reader import TopicReader
from consumer.metrics import Metrics

REGISTRY_LOAD_TIMEOUT_S: Final = 60.0

log = logging.getLogger(__name__)

DEFAULT_RECHECK_S: Final = 10.0  # how often partition metadata is looked at again
_POLL_S: Final = 0.25


class RegistryFollower:
    """Keeps an EndpointRegistry in step with the registry topic, in a daemon thread.

    `start()` marks the registry not loaded; it becomes loaded once the topic was read to its
    end (or found missing). Invalid records are ignored and counted by reason; the registry
    logs the Space and the reason, never the URL.
    """

    def __init__(
        self,
        settings: Settings,
        registry: EndpointRegistry,
        metrics: Metrics,
        topic: str = ENDPOINTS_TOPIC,
        recheck_s: float = DEFAULT_RECHECK_S,
    ) -> None:
        self._settings = settings
        self.registry = registry
        self._metrics = metrics
        self.topic = topic
        self._recheck_s = recheck_s
        self._loaded = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.records_applied = 0
        self.records_invalid = 0

    def start(self) -> None:
        """Start following; returns at once (see `wait_loaded`)."""
        if self._thread is not None:
            raise RuntimeError("RegistryFollower already started")
        self.registry.loaded = False
        self._thread = threading.Thread(target=self._run, name="endpoint-registry", daemon=True)
        self._thread.start()

    def wait_loaded(self, timeout: float) -> bool:
        """True once the topic was read to its end (or found missing) within the timeout."""
        return self._loaded.wait(timeout)

    async def until_loaded(
        self, stopping: Callable[[], bool], timeout: float = REGISTRY_LOAD_TIMEOUT_S
    ) -> None:
        """Return once the topic was read to its end, or the role is stopping: a role delivers
        and serves nothing before (docs/architecture.md). KafkaFailure after `timeout`."""
        deadline = time.monotonic() + timeout
        while not await asyncio.to_thread(self.wait_loaded, 0.5):
            if stopping():
                return
            if time.monotonic() > deadline:
                raise KafkaFailure(f"endpoint registry topic not read to its end within {timeout:.0f}s")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop following and close the Kafka consumer."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("endpoint registry follower did not stop within %.0fs", timeout)

    # The thread -------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            reader = TopicReader(self._settings, self.topic)
        except PerkamoError as exc:
            log.error("endpoint registry follower cannot start: %s", exc)
            return
        try:
            self._follow(reader)
        except Exception:
            # Keep the registry as it is (deliveries go on with it); say loudly that it is stale.
            log.exception("endpoint registry follower stopped; endpoint changes are not applied")
        finally:
            reader.close()

    def _follow(self, reader: TopicReader) -> None:
        next_check = 0.0
        missing_logged = False
        unreachable_logged = False
        while not self._stop.is_set():
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + self._recheck_s
                try:
                    exists = reader.refresh()
                except KafkaFailure as exc:
                    if not unreachable_logged:
                        log.warning("endpoint registry topic %s: metadata failed (%s); retrying",
                                    self.topic, exc)
                        unreachable_logged = True
                    exists = None
                    next_check = time.monotonic() + min(1.0, self._recheck_s)
                else:
                    unreachable_logged = False
                if exists is False and not missing_logged:
                    log.warning(
                        "endpoint registry topic %s does not exist: endpoints come from "
                        "PERKAMO_ENDPOINTS_FILE only (create it with `perkamo-webhooks topics`); "
                        "checking again every %.0fs", self.topic, self._recheck_s,
                    )
                    missing_logged = True
                    self._mark_loaded("no registry topic")
                elif exists and missing_logged:
                    log.info("endpoint registry topic %s appeared; following it", self.topic)
                    missing_logged = False
            if not reader.assigned:
                self._stop.wait(min(1.0, max(0.0, next_check - time.monotonic())))
                continue
            records = reader.poll(_POLL_S)
            for msg in records:
                self._apply(msg)
            if records:
                self._metrics.endpoints_loaded.set(self.registry.active_count())
            if reader.caught_up and not self._loaded.is_set():
                self._mark_loaded(f"read {self.topic} to its end")

    def _apply(self, msg: Message) -> None:
        reason = self.registry.apply(msg.key(), msg.value())
        if reason is None:
            self.records_applied += 1
            return
        self.records_invalid += 1
        self._metrics.endpoint_records_invalid.labels(reason).inc()
        log.debug("registry record %s[%d]@%d ignored (%s)",
                  msg.topic(), msg.partition(), msg.offset(), reason)

    def _mark_loaded(self, why: str) -> None:
        self._metrics.endpoints_loaded.set(self.registry.active_count())
        if not self._loaded.is_set():
            log.info("endpoint registry loaded (%s): %d active endpoints, %d records applied, "
                     "%d ignored", why, self.registry.active_count(), self.records_applied,
                     self.records_invalid)
        self.registry.loaded = True
        self._loaded.set()
