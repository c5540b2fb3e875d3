"""The size budget end to end (consumer.budget): an event the service accepts can always be
delivered, recorded and, if need be, dead-lettered; one it refuses is dead-lettered whole or as
a stub; and a big event never wedges the partition it shares with other Spaces."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
)

from consumer import constants as c
from consumer.budget import STUB_HEAD_BYTES, budget_of
from tests.support import end_offsets, event_rows, make_event, read_topic, wait_for

pytestmark = pytest.mark.integration

MAX_PAYLOAD = 1_048_576  # the default
BUDGET = budget_of(MAX_PAYLOAD)


def padded(space: str, size: int) -> bytes:
    """A valid event of exactly `size` bytes."""
    event = make_event(space)
    event["data"]["context"] = {"pad": ""}
    bare = len(orjson.dumps(event))
    event["data"]["context"]["pad"] = "x" * (size - bare)
    value = orjson.dumps(event)
    assert len(value) == size
    return value


def allow(kafka: str, topic: str, size: int) -> None:
    """Let `topic` take messages of `size` bytes (as an upstream cluster may). After the roles
    start: starting them keeps every topic at the budget, as `perkamo-webhooks topics` does."""
    admin = AdminClient({"bootstrap.servers": kafka})
    entry = ConfigEntry("max.message.bytes", str(size), incremental_operation=AlterConfigOpType.SET)
    resource = ConfigResource(ConfigResource.Type.TOPIC, topic, incremental_configs=[entry])
    for fut in admin.incremental_alter_configs([resource]).values():
        fut.result(30)


def produce_big(kafka: str, topic: str, values: list[bytes], partition: int = 0) -> None:
    """A producer allowed to send what the service's own may not."""
    producer = Producer({"bootstrap.servers": kafka, "message.max.bytes": 4_000_000,
                         "compression.type": "none"})
    errors: list[Any] = []
    for value in values:
        producer.produce(topic, value, partition=partition,
                         on_delivery=lambda err, _msg: errors.append(err) if err else None)
    assert producer.flush(30) == 0
    assert errors == [], errors  # the broker took every one


def ids(values: list[bytes]) -> list[str]:
    return [orjson.loads(v)["id"] for v in values]


async def test_events_at_the_budget_are_delivered_and_recorded_one_past_is_dead_lettered_whole(
    harness: Any, receiver: Any
) -> None:
    space = "s-budget"
    await harness.start(harness.settings([{"space": space, "url": receiver.url("/big")}]))
    allow(harness.kafka, harness.events_topic, 4_000_000)
    at_limit, librdkafka_default_plus_one, over = (
        padded(space, MAX_PAYLOAD), padded(space, 1_000_001), padded(space, MAX_PAYLOAD + 1))
    before = end_offsets(harness.kafka, [c.DLQ_TOPIC])
    produce_big(harness.kafka, harness.events_topic, [at_limit, librdkafka_default_plus_one, over])

    await wait_for(lambda: len(receiver.to("/big")) >= 2, timeout=30, what="the two events in budget")
    assert sorted(r.body for r in receiver.to("/big")) == sorted([at_limit, librdkafka_default_plus_one])
    for event_id in ids([at_limit, librdkafka_default_plus_one]):

        def recorded(event_id: str = event_id) -> list[tuple[Any, ...]]:
            return event_rows(harness.store, event_id, ["status"])

        rows = await wait_for(recorded, timeout=30, what="the attempt's history row")
        assert rows == [(c.STATUS_DELIVERED,)]

    [letter] = read_topic(harness.kafka, c.DLQ_TOPIC, since=before, expect=1, timeout=20)
    headers = dict(letter.headers())
    assert headers[c.K_DLQ_REASON] == b"oversized"
    assert letter.value() == over  # within the budget's room: kept whole, not cut
    assert ids([over])[0] not in {orjson.loads(r.body)["id"] for r in receiver.to("/big")}


async def test_an_event_far_over_the_budget_is_dead_lettered_as_a_stub(harness: Any, receiver: Any) -> None:
    space = "s-huge"
    await harness.start(harness.settings([{"space": space, "url": receiver.url("/huge")}]))
    allow(harness.kafka, harness.events_topic, 4_000_000)
    huge = padded(space, 3_000_000)
    before = end_offsets(harness.kafka, [c.DLQ_TOPIC])
    produce_big(harness.kafka, harness.events_topic, [huge, padded(space, 2000)])
    await wait_for(lambda: receiver.to("/huge"), timeout=30, what="the small event behind the huge one")

    [stub] = read_topic(harness.kafka, c.DLQ_TOPIC, since=before, expect=1, timeout=20)
    headers = dict(stub.headers())
    assert headers[c.K_DLQ_REASON] == b"oversized"
    assert headers[c.K_VALUE_BYTES] == b"3000000"
    assert headers[c.K_VALUE_SHA256] == hashlib.sha256(huge).hexdigest().encode()
    assert headers[c.K_ORIGIN_TOPIC] == harness.events_topic.encode()
    assert stub.value() == huge[:STUB_HEAD_BYTES]


async def test_a_big_event_on_a_shared_partition_is_not_delivered_again_after_a_clean_restart(
    harness: Any, receiver: Any
) -> None:
    """The wedge: one ~1,030,000-byte event among two Spaces' events on one partition. Once
    everything was delivered and the role stopped cleanly, a restart delivers nothing again."""
    endpoints = [{"space": "s-wedge-a", "url": receiver.url("/a")},
                 {"space": "s-wedge-b", "url": receiver.url("/b")}]
    settings = harness.settings(endpoints)
    app = await harness.start(settings)
    allow(harness.kafka, harness.events_topic, 4_000_000)
    values = [orjson.dumps(make_event("s-wedge-a" if i % 2 else "s-wedge-b")) for i in range(40)]
    values.insert(5, padded("s-wedge-a", 1_030_000))
    produce_big(harness.kafka, harness.events_topic, values, partition=0)
    await wait_for(lambda: len(receiver.requests) >= len(values), timeout=60, what="every event")
    await asyncio.sleep(1.0)  # commits (every 0.2 s) catch up
    await harness.stop(app)

    delivered = len(receiver.requests)
    await harness.start(settings)
    await asyncio.sleep(6.0)  # time enough to redeliver anything left uncommitted
    assert len(receiver.requests) == delivered == len(values)
    assert sorted(orjson.loads(r.body)["id"] for r in receiver.requests) == sorted(ids(values))
