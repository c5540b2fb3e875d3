"""What the broker says about the service's topics, and whether it answers at all.

- `topic_state`: which topics exist, their replica counts and their configs as the broker
  reports them (describe_configs), for the start-up check (consumer.topic_check) and
  `perkamo-webhooks topics`.
- `BrokerWatch`: a thread that makes a broker round trip every few seconds; a role is ready
  only while the last one is recent (docs/operations.md, "While Kafka is unreachable"). Each
  round also reads the high watermarks of the role's assigned partitions, which librdkafka's
  statistics stop refreshing for a paused partition (consumer.watermarks).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # the stubs omit re-exports
    AdminClient,
    ConfigResource,
    OffsetSpec,
)

from consumer.errors import KafkaFailure
from consumer.kafka_io import Source, client_config, make_client
from consumer.kafka_topics import admin_client
from consumer.watermarks import WATERMARKS, Watermarks

log = logging.getLogger(__name__)

TP = tuple[str, int]


@dataclass(frozen=True)
class TopicState:
    """The broker's view of some topics: replica counts of those that exist, and their configs."""

    replicas: dict[str, int] = field(default_factory=dict)
    configs: dict[str, dict[str, str]] = field(default_factory=dict)

    def exists(self, name: str) -> bool:
        return name in self.replicas


def topic_state(source: Source, names: Collection[str], timeout: float = 15.0) -> TopicState:
    """One metadata request (all topics: it never auto-creates one) and one describe_configs."""
    admin = admin_client(source)
    try:
        meta = admin.list_topics(timeout=timeout).topics
    except KafkaException as exc:
        raise KafkaFailure(f"cannot list the broker's topics: {exc}") from None
    replicas = {
        name: max((len(p.replicas) for p in meta[name].partitions.values()), default=0)
        for name in names if name in meta and meta[name].error is None
    }
    configs: dict[str, dict[str, str]] = {}
    if replicas:
        resources = [ConfigResource(ConfigResource.Type.TOPIC, name) for name in replicas]
        for resource, fut in admin.describe_configs(resources, request_timeout=timeout).items():
            try:
                configs[resource.name] = {k: v.value for k, v in fut.result(timeout).items()}
            except KafkaException as exc:
                raise KafkaFailure(f"cannot read the config of topic {resource.name}: {exc}") from None
    return TopicState(replicas, configs)


class BrokerWatch:
    """A round trip (DescribeCluster: no topic metadata, so cheap on a cluster of many topics)
    every `interval_s` on its own admin client; `reachable` while the
    last success is at most `stale_s` old. librdkafka's "all brokers down" error makes it
    unreachable at once. Each round also reads the high watermarks of the partitions whose
    lag is recorded in this process (consumer.watermarks)."""

    def __init__(
        self,
        source: Source,
        interval_s: float = 2.0,
        stale_s: float = 10.0,
        watermarks: Watermarks = WATERMARKS,
    ) -> None:
        self._interval = interval_s
        self._stale = stale_s
        self._watermarks = watermarks
        self._last_ok = 0.0
        self._down_since: float | None = None
        self._said_down = False
        self._stop = threading.Event()
        config = {
            **client_config(source),
            "client.id": "perkamo-webhooks-watch",
            "error_cb": self._on_error,
            # Its own ERROR and WARNING lines say when Kafka stops and starts answering; without
            # these, librdkafka logs a connection failure every few tens of milliseconds.
            "log_level": 2,
            "reconnect.backoff.max.ms": 2000,
        }
        self._admin: AdminClient = make_client(AdminClient, config)
        self._thread = threading.Thread(target=self._run, name="broker-watch", daemon=True)

    @property
    def reachable(self) -> bool:
        return self._last_ok > 0 and time.monotonic() - self._last_ok <= self._stale

    def start(self) -> None:
        self._last_ok = time.monotonic()  # the role has just waited for the broker
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self._interval + 5)

    def _on_error(self, err: KafkaError) -> None:
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            self._last_ok = 0.0

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.check()

    def check(self) -> None:
        """One round: the cluster's description, then the high watermarks of the partitions wanted."""
        timeout = max(1.0, self._interval)
        try:
            self._admin.describe_cluster(request_timeout=timeout).result(timeout + 1)
        except KafkaException:
            self._admin.poll(0)  # serve error events (all brokers down)
            self._unanswered()
            return
        if self._said_down and self._down_since is not None:
            log.warning("Kafka answers again after %.0fs; ready again", time.monotonic() - self._down_since)
        self._down_since, self._said_down = None, False
        self._last_ok = time.monotonic()
        self._read_high(self._watermarks.wanted(), timeout)

    def _unanswered(self) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
        if not self.reachable and not self._said_down:
            self._said_down = True
            log.error("Kafka has not answered for %.0fs: this process reports not ready until it "
                      "does (check the brokers and PERKAMO_KAFKA_BOOTSTRAP_SERVERS)",
                      time.monotonic() - self._down_since)

    def _read_high(self, tps: Sequence[TP], timeout: float) -> None:
        if not tps:
            return
        latest = OffsetSpec.latest()  # type: ignore[no-untyped-call]
        ask = {TopicPartition(t, p): latest for t, p in tps}
        high: dict[TP, int] = {}
        try:
            answers = self._admin.list_offsets(ask, request_timeout=timeout)
        except KafkaException:
            return
        for tp, fut in answers.items():
            try:
                high[(tp.topic, tp.partition)] = int(fut.result(timeout).offset)
            except KafkaException:
                continue  # a leader moving, a topic gone: the next round reads it
        self._watermarks.update(high)
