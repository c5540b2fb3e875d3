"""The whole body of a delivery whose attempt records carry a cut one, read back from Kafka.

History keeps a bounded prefix of a big body (consumer.attempts); the whole body is the event
message itself, at the row's source topic, partition and offset, for as long as the topic's
retention keeps it. A resend or replay must publish that whole body, never the cut one, so it
is read here: one short-lived consumer (assign and seek, no group membership, nothing
committed), a bounded wait, and a check against the length and SHA-256 history recorded.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from consumer.errors import OriginalOutOfReach, OriginalUnavailable
from consumer.kafka_io import Source, client_config, make_client

log = logging.getLogger(__name__)

WAIT_S: Final = 10.0  # for all the originals one call reads
_GROUP: Final = "perkamo-webhooks-originals"  # librdkafka wants one; it is never joined or committed


Refusal = OriginalUnavailable | OriginalOutOfReach


@dataclass(frozen=True, slots=True)
class Wanted:
    """Where a delivery's event was first read, and what history recorded of its whole body."""

    delivery_id: str
    topic: str
    partition: int
    offset: int
    size: int
    sha256: str

    @property
    def where(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


def read_originals(
    source: Source, wanted: Sequence[Wanted], wait_s: float = WAIT_S
) -> dict[str, bytes | Refusal]:
    """Per delivery id, its whole body (checked), or why it cannot be had: a sentence."""
    if not wanted:
        return {}
    config = {
        **client_config(source),
        "group.id": _GROUP,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "enable.partition.eof": True,
        "auto.offset.reset": "error",  # never a neighbour's message in place of the one asked for
        "client.id": "perkamo-webhooks-originals",
        # A broker out of reach is said once, in the refusal's sentence; without these,
        # librdkafka logs a connection failure every few tens of milliseconds of the wait.
        "log_level": 2,
        "error_cb": _quiet,
    }
    consumer: Consumer = make_client(Consumer, config)
    deadline = time.monotonic() + wait_s
    try:
        return {w.delivery_id: _read_one(consumer, w, deadline) for w in wanted}
    finally:
        consumer.close()


def _read_one(consumer: Consumer, w: Wanted, deadline: float) -> bytes | Refusal:
    value = _fetch(consumer, w, deadline)
    if not isinstance(value, bytes):
        log.warning("delivery %s: %s", w.delivery_id, value)
        return value
    if len(value) != w.size or hashlib.sha256(value).hexdigest() != w.sha256:
        why = OriginalUnavailable(
            f"delivery {w.delivery_id} cannot be re-published: history keeps only the first bytes "
            f"of its body, and the message at {w.where} is not that body (its length or SHA-256 "
            "differs from what history recorded)"
        )
        log.warning("%s", why)
        return why
    return value


def _fetch(consumer: Consumer, w: Wanted, deadline: float) -> bytes | Refusal:
    gone = (
        f"delivery {w.delivery_id} cannot be re-published: history keeps only the first bytes of "
        f"its {w.size:,}-byte body, and the original at {w.where} is"
    )
    problem = _off_the_topic(consumer, w, deadline, gone)
    if problem:
        return problem
    consumer.assign([TopicPartition(w.topic, w.partition, w.offset)])
    try:
        while (left := _left(deadline)) > 0:
            for msg in consumer.consume(1, min(left, 1.0)):
                err = msg.error()
                if err is None and msg.offset() == w.offset:
                    return msg.value() or b""
                if err is not None and err.code() == KafkaError._AUTO_OFFSET_RESET:
                    return OriginalUnavailable(f"{gone} past the topic's retention")
                if err is not None and err.code() != KafkaError._PARTITION_EOF:
                    return OriginalUnavailable(f"{gone} unreadable ({err.str()})")
                # A later offset, or the partition's end, where it should be: compacted away.
                return OriginalUnavailable(f"{gone} no longer there")
        return OriginalOutOfReach(f"{gone} out of reach: not read in time; try again")
    finally:
        consumer.unassign()


def _off_the_topic(consumer: Consumer, w: Wanted, deadline: float, gone: str) -> Refusal | None:
    """Why the partition cannot hold the offset now (None if it may)."""
    tp = TopicPartition(w.topic, w.partition)
    try:
        low, high = consumer.get_watermark_offsets(tp, timeout=_left(deadline), cached=False)
    except KafkaException as exc:
        err = exc.args[0] if exc.args else None
        if isinstance(err, KafkaError) and err.code() in (
            KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC, KafkaError._UNKNOWN_PARTITION
        ):
            return OriginalUnavailable(f"{gone} no longer there (the topic or partition is gone)")
        return OriginalOutOfReach(f"{gone} out of reach: Kafka did not answer in time ({exc}); try again")
    if w.offset < low:
        return OriginalUnavailable(
            f"{gone} past the topic's retention (the partition starts at offset {low} now)")
    if w.offset >= high:
        return OriginalUnavailable(f"{gone} not on the topic (the partition ends before offset {w.offset})")
    return None


def _quiet(err: KafkaError) -> None:
    log.debug("reading an original: %s", err)


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())
