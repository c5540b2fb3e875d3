"""Thin, typed wrappers over confluent-kafka: client configs, an asyncio-friendly producer
whose failures say whether trying again can help (KafkaWriteFailed.permanent), topic creation.
Application logic lives above; nothing here imports it.

`client_config(settings)` is the one place a librdkafka configuration starts from, for every
client the service and the CLI create: `bootstrap.servers` plus every PERKAMO_KAFKA_<NAME>
property (TLS, SASL, ...). Each function below takes the Settings (or, for callers that only
have the bootstrap string, that string: the properties registered for it by `use_settings`
are applied, so a client made from `settings.kafka_bootstrap_servers` is secured as well).
Secret properties never reach a log line: `describe_config` masks them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from collections.abc import Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka import Message as _LibrdkafkaMessage

from consumer.budget import budget_of
from consumer.config import Settings
from consumer.errors import ConfigError, KafkaFailure, KafkaWriteFailed
from consumer.setting_values import is_secret_property, kafka_env_name

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]
# A consumed (or acknowledged) message: the rest of the service names librdkafka's type
# through this module, the one seam to confluent-kafka.
Message = _LibrdkafkaMessage
Source = Settings | str  # Settings, or a bootstrap string (see use_settings)

# bootstrap servers -> the PERKAMO_KAFKA_* properties of the settings that named them.
_PROPERTIES: dict[str, dict[str, str]] = {}
_DEFAULT_MAX_PAYLOAD: int = Settings.model_fields["max_payload_bytes"].default


def use_settings(settings: Settings) -> None:
    """Remember the settings' Kafka properties for clients made from their bootstrap string."""
    _PROPERTIES[settings.kafka_bootstrap_servers] = dict(settings.kafka)


def client_config(source: Source) -> dict[str, Any]:
    """`bootstrap.servers` and every PERKAMO_KAFKA_<NAME> property: the start of every client."""
    if isinstance(source, Settings):
        use_settings(source)
        bootstrap, props = source.kafka_bootstrap_servers, dict(source.kafka)
    else:
        bootstrap, props = source, dict(_PROPERTIES.get(source, {}))
    return {"bootstrap.servers": bootstrap, **props}


def bootstrap_of(source: Source) -> str:
    return source.kafka_bootstrap_servers if isinstance(source, Settings) else source


def describe_config(config: dict[str, Any]) -> dict[str, str]:
    """A client config fit for a log line: secret properties masked, callbacks left out."""
    return {k: ("********" if is_secret_property(k) else str(v))
            for k, v in config.items() if not callable(v)}


def make_client(kind: type[Any], config: dict[str, Any]) -> Any:
    """Create a librdkafka client; an unknown or invalid property is a ConfigError naming it."""
    try:
        return kind(config)
    except (KafkaException, ValueError, TypeError) as exc:
        err = exc.args[0] if exc.args else None
        text = err.str() if isinstance(err, KafkaError) else str(exc)
        for prop in config:
            if f'"{prop}"' in text or f"'{prop}'" in text or f" {prop}:" in text:
                raise ConfigError(f"{kafka_env_name(prop)}: librdkafka refused property "
                                  f"{prop} ({scrub(text, config)})") from None
        raise ConfigError(f"Kafka client configuration refused: {scrub(text, config)} "
                          "(check the PERKAMO_KAFKA_* settings)") from None


def scrub(text: str, config: dict[str, Any]) -> str:
    """librdkafka's message without any secret value in it."""
    for prop, value in config.items():
        if is_secret_property(prop) and isinstance(value, str) and value:
            text = text.replace(value, "********")
    return text


def consumer_config(
    source: Source, group_id: str, protocol: str, stats_interval_s: float = 5.0
) -> dict[str, Any]:
    """Offsets are committed explicitly by the service, never automatically
    (docs/architecture.md, offsets)."""
    config: dict[str, Any] = {
        **client_config(source),
        "group.id": group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "enable.partition.eof": False,
        "statistics.interval.ms": int(stats_interval_s * 1000),
        "fetch.wait.max.ms": 100,
        "queued.max.messages.kbytes": 16384,
        "client.id": "perkamo-webhooks",
    }
    if protocol == "consumer":
        config["group.protocol"] = "consumer"  # KIP-848: takes no assignment strategy
        # The broker's default ("uniform") balances partition counts over all topics together,
        # which can hand one member every events partition and another only retry tiers;
        # "range" spreads each topic's partitions over the members.
        config["group.remote.assignor"] = "range"
    else:
        config["partition.assignment.strategy"] = "cooperative-sticky"
        config["session.timeout.ms"] = 10000
        config["max.poll.interval.ms"] = 300000
    return config


# Kafka refused the message itself: sending it again cannot help (consumer.durable).
_REFUSED_MESSAGE = frozenset({
    KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.INVALID_RECORD,
    KafkaError._INVALID_ARG, KafkaError._BAD_MSG, KafkaError.UNSUPPORTED_FOR_MESSAGE_FORMAT,
    KafkaError.POLICY_VIOLATION,
})
# librdkafka gives up on a message after this long (its own retries included); the caller then
# decides (consumer.durable tries again, so a long outage is waited out, never abandoned).
MESSAGE_TIMEOUT_MS = 30_000


def producer_config(source: Source) -> dict[str, Any]:
    """The producer takes the size budget's largest message (consumer.budget); a
    PERKAMO_KAFKA_MESSAGE_MAX_BYTES setting overrides it and is checked at start-up."""
    max_payload = source.max_payload_bytes if isinstance(source, Settings) else _DEFAULT_MAX_PAYLOAD
    return {
        "message.max.bytes": budget_of(max_payload).message_max_bytes,
        "message.timeout.ms": MESSAGE_TIMEOUT_MS,
        **client_config(source),
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        # The Java client's partitioner, so keys land where other Kafka tools expect them.
        "partitioner": "murmur2_random",
        "compression.type": "lz4",
        "client.id": "perkamo-webhooks",
    }


class AsyncProducer:
    """Idempotent producer whose `publish()` returns when Kafka acknowledged the message.

    A background thread serves delivery reports; a delivery error fails that one future.
    Reports are handed to the event loop in bursts: the first report of a burst schedules one
    callback on the loop, which settles every report that arrived meanwhile, so thousands of
    acknowledgements per second cost the loop a few wake-ups, not one each. One loop per
    producer.
    """

    def __init__(self, source: Source, extra: dict[str, Any] | None = None) -> None:
        self._producer: Producer = make_client(Producer, {**producer_config(source), **(extra or {})})
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reports: list[tuple[asyncio.Future[Message], Any, Message]] = []
        self._reports_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="kafka-producer", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.05)

    async def publish(
        self, topic: str, value: bytes | None, key: bytes | str | None = None, headers: Headers | None = None
    ) -> Message:
        if self._closed:
            raise KafkaFailure("producer is closed")
        loop = self._loop
        if loop is None:  # the first publish names the loop (get_running_loop() costs a getpid)
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[Message] = loop.create_future()
        report = functools.partial(self._reported, future)
        while True:
            try:
                self._producer.produce(
                    topic,
                    value=value,
                    key=key,
                    headers=headers,  # type: ignore[arg-type]  # the stub's list is invariant
                    on_delivery=report,
                )
                break
            except BufferError:  # local queue full: let the background thread drain it
                await asyncio.sleep(0.01)
            except KafkaException as exc:  # refused before it left (e.g. over message.max.bytes)
                raise write_failure(topic, exc.args[0] if exc.args else None) from None
        return await future

    def _reported(self, future: asyncio.Future[Message], err: Any, msg: Message) -> None:
        """librdkafka's delivery report, on whichever thread polled (ours, or a flush)."""
        with self._reports_lock:
            first = not self._reports
            self._reports.append((future, err, msg))
        if first and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                self._loop.call_soon_threadsafe(self._settle_reports)

    def _settle_reports(self) -> None:
        with self._reports_lock:
            reports, self._reports = self._reports, []
        for future, err, msg in reports:
            _settle(future, err, msg)

    def flush(self, timeout: float) -> int:
        return int(self._producer.flush(timeout))

    def close(self, timeout: float = 10.0) -> None:
        left = self.flush(timeout)
        if left:
            log.error("producer closed with %d messages not acknowledged", left)
        self._stop.set()
        self._thread.join(2)
        self._closed = True
        del self._producer  # release the librdkafka handle (its threads keep reconnecting otherwise)


def _settle(future: asyncio.Future[Message], err: Any, msg: Message) -> None:
    if future.done():
        return
    if err is not None:
        future.set_exception(write_failure(msg.topic() or "?", err))
    else:
        future.set_result(msg)


def write_failure(topic: str, err: Any) -> KafkaWriteFailed:
    """librdkafka's error for one message as a KafkaWriteFailed: permanent when Kafka refused
    the message itself, otherwise worth trying again (a missing topic included: the operator
    can create it, and nothing is lost meanwhile)."""
    if isinstance(err, KafkaError):
        code = err.code()
        permanent = code in _REFUSED_MESSAGE
        return KafkaWriteFailed(topic, code, err.name(), err.str(), permanent)
    return KafkaWriteFailed(topic, -1, "unknown", str(err), permanent=False)


def publish_now(
    source: Source,
    messages: Sequence[tuple[str, bytes | None, bytes | str | None]],
    timeout: float,
    client_id: str = "perkamo-webhooks-cli",
) -> list[tuple[int, int]]:
    """Publish (topic, value, key) messages from a command (the CLI, the demo, the console's
    registry writes) and wait for every acknowledgement: their (partition, offset), in order.
    KafkaFailure when the broker refused one or did not answer within `timeout` (then a
    message may or may not be published)."""
    producer: Producer = make_client(Producer, {**producer_config(source), "client.id": client_id})
    reports: list[tuple[Any, Any] | None] = [None] * len(messages)

    def reporter(n: int) -> Any:
        def on_delivery(err: Any, msg: Any) -> None:
            reports[n] = (err, msg)
        return on_delivery

    try:
        for n, (topic, value, key) in enumerate(messages):
            producer.produce(topic, value=value, key=key, on_delivery=reporter(n))
        producer.flush(timeout)
    except KafkaException as exc:
        raise KafkaFailure(f"publish failed: {exc}") from None
    finally:
        del producer  # one left open would keep reconnecting after the broker stops
    out = []
    for report in reports:
        if report is None:
            raise KafkaFailure(f"Kafka did not acknowledge within {timeout:.0f}s; a message may or "
                               "may not be published")
        err, msg = report
        if err is not None:
            raise KafkaFailure(f"publish to {msg.topic()} failed: {err}")
        out.append((int(msg.partition()), int(msg.offset())))
    return out


def header_list(msg: Message) -> Headers:
    """Message headers as (name, bytes) pairs; headers without a value are left out."""
    out: Headers = []
    for pair in msg.headers() or []:
        name, value = pair[0], pair[1]
        if value is None:
            continue
        out.append((name, value if isinstance(value, bytes) else str(value).encode()))
    return out


def header_map(msg: Message) -> dict[str, bytes]:
    """Message headers as a dict (the last value wins if a name repeats)."""
    return dict(header_list(msg))


def position(msg: Message) -> tuple[str, int, int]:
    """(topic, partition, offset) of a consumed message."""
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    if topic is None or partition is None or offset is None:
        raise KafkaFailure("consumed message has no topic/partition/offset")
    return topic, partition, offset
