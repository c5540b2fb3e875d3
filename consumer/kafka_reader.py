"""Reading a whole topic by assignment (no group, no commits), from its beginning to the end it
had when read: the endpoint registry's follower and `endpoints list` use it. Part of the Kafka
wrapper: nothing here knows what the records mean."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Final

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from consumer.errors import KafkaFailure
from consumer.kafka_io import Message, Source, client_config, make_client

log = logging.getLogger(__name__)

_METADATA_TIMEOUT_S: Final = 5.0
_POLL_S: Final = 0.25
_BATCH: Final = 500


def reader_config(source: Source, client_id: str = "perkamo-webhooks-registry") -> dict[str, Any]:
    """A consumer that reads by assignment only: no group membership, no offset commits."""
    return {
        **client_config(source),
        "group.id": f"{client_id}-{uuid.uuid4().hex}",  # required by librdkafka, never joined
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "enable.partition.eof": True,
        "allow.auto.create.topics": False,
        "auto.offset.reset": "earliest",
        "fetch.wait.max.ms": 100,
        "client.id": client_id,
    }


class TopicReader:
    """Reads every partition of one topic from the beginning and tells when it caught up.

    Caught up = each partition reached the high watermark it had when it was assigned.
    Not thread-safe: one thread owns it (the follower's, or the CLI's main thread).
    """

    def __init__(
        self, source: Source, topic: str, client_id: str = "perkamo-webhooks-registry"
    ) -> None:
        self.topic = topic
        self._consumer: Consumer = make_client(Consumer, reader_config(source, client_id))
        self._partitions: set[int] = set()
        self._pending: dict[int, int] = {}  # partition -> high watermark still to reach

    @property
    def assigned(self) -> bool:
        return bool(self._partitions)

    @property
    def caught_up(self) -> bool:
        return self.assigned and not self._pending

    def refresh(self) -> bool:
        """Assign partitions not assigned yet; False if the topic does not exist.

        Raises KafkaFailure when the broker does not answer in time.
        """
        try:
            return self._assign_new()
        except KafkaException as exc:
            raise KafkaFailure(f"cannot read topic {self.topic}: {exc}") from None

    def _assign_new(self) -> bool:
        meta = self._consumer.list_topics(self.topic, timeout=_METADATA_TIMEOUT_S)
        topic_meta = meta.topics.get(self.topic)
        error = topic_meta.error if topic_meta is not None else None
        if error is not None and error.code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
            raise KafkaException(error)
        if topic_meta is None or error is not None or not topic_meta.partitions:
            return False
        new = sorted(set(topic_meta.partitions) - self._partitions)
        if not new:
            return True
        ends: dict[int, int] = {}
        for partition in new:
            low, high = self._consumer.get_watermark_offsets(
                TopicPartition(self.topic, partition), timeout=_METADATA_TIMEOUT_S
            )
            if high > low:
                ends[partition] = high
        self._consumer.incremental_assign(
            [TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in new]
        )
        self._partitions.update(new)
        self._pending.update(ends)
        return True

    def poll(self, timeout: float) -> list[Message]:
        """The next records (tombstones included); partition-EOF events only update progress."""
        records: list[Message] = []
        for msg in self._consumer.consume(_BATCH, timeout):
            error = msg.error()
            partition = msg.partition() or 0
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    self._pending.pop(partition, None)
                else:
                    log.warning("reading %s: %s", self.topic, error)
                continue
            end = self._pending.get(partition)
            if end is not None and (msg.offset() or 0) + 1 >= end:
                del self._pending[partition]
            records.append(msg)
        return records

    def close(self) -> None:
        self._consumer.close()


def read_all(source: Source, topic: str, timeout: float) -> list[Message] | None:
    """Every record of the topic up to its current end, in order; None if it does not exist.

    Raises KafkaFailure when the broker does not answer, or the end is not reached in time.
    """
    reader = TopicReader(source, topic, client_id="perkamo-webhooks-cli")
    deadline = time.monotonic() + timeout
    try:
        if not reader.refresh():
            return None
        records: list[Message] = []
        while not reader.caught_up:
            if time.monotonic() > deadline:
                raise KafkaFailure(f"topic {topic} not read to its end within {timeout:.0f}s")
            records.extend(reader.poll(_POLL_S))
        return records
    finally:
        reader.close()
