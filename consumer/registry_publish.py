"""Publishing to the endpoint registry topic `perkamo.webhooks.endpoints` (docs/architecture.md, endpoints).

One record (key = the Space's slug; None = a tombstone) per call, acknowledged by the broker
before it returns. `endpoints set|remove` and the console's endpoint forms both publish here,
so what one does the other does. Blocking: call it from a thread in async code
(`asyncio.to_thread`), as the console does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any, NamedTuple

import orjson

from consumer.constants import ENDPOINTS_TOPIC
from consumer.errors import KafkaFailure
from consumer.kafka_io import Source, publish_now
from consumer.kafka_topics import topic_configs, topic_names

log = logging.getLogger(__name__)


class Receipt(NamedTuple):
    """Where the broker stored a registry record."""

    partition: int
    offset: int


def check_registry_topic(source: Source, timeout: float) -> str | None:
    """Refuse a missing topic (the broker could auto-create it uncompacted); returns a warning
    when it exists without compaction (records would expire), else None."""
    if ENDPOINTS_TOPIC not in topic_names(source, timeout):
        raise KafkaFailure(f"topic {ENDPOINTS_TOPIC} does not exist; create it (compacted) with "
                         "`perkamo-webhooks topics`")
    configs = topic_configs(source, [ENDPOINTS_TOPIC]).get(ENDPOINTS_TOPIC, {})
    policy = configs.get("cleanup.policy")
    if policy is not None and "compact" not in policy:
        return (f"{ENDPOINTS_TOPIC} has cleanup.policy={policy}, not compact: "
                "records will expire and consumers would lose their endpoints")
    return None


def publish_registry_record(
    source: Source, space: str, value: bytes | None, timeout: float,
    client_id: str = "perkamo-webhooks-cli",
) -> Receipt:
    """Publish one record keyed by the space (None = tombstone) and wait for the broker's ack.

    The topic must exist (see check_registry_topic). Raises KafkaFailure when the broker did not
    acknowledge in time or refused the record.
    """
    try:
        [(partition, offset)] = publish_now(source, [(ENDPOINTS_TOPIC, value, space.encode())], timeout,
                                            client_id=client_id)
    except KafkaFailure as exc:
        raise KafkaFailure(f"{exc}: check with `perkamo-webhooks endpoints list`") from None
    return Receipt(partition, offset)


async def publish_endpoint_record(
    source: Source, space: str, record: Mapping[str, Any] | None, timeout: float = 15.0,
    client_id: str = "perkamo-webhooks-console",
) -> Receipt:
    """Async-safe: check the topic and publish a record (None = tombstone) from a thread, as
    `endpoints set|remove` do. The caller validates the record (endpoints.parse_record)."""
    value = None if record is None else orjson.dumps(dict(record))

    def publish() -> Receipt:
        warning = check_registry_topic(source, timeout)
        if warning:
            log.warning("%s", warning)
        return publish_registry_record(source, space, value, timeout, client_id=client_id)

    return await asyncio.to_thread(publish)
