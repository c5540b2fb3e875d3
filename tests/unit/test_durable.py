"""The durable publisher with a producer that refuses: transient failures are waited out,
refusals become stub dead letters, nothing is lost or mislabelled (no broker)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any

import pytest

from consumer import constants as c
from consumer import durable
from consumer.budget import STUB_HEAD_BYTES, budget_of
from consumer.durable import DurablePublisher, Outgoing
from consumer.errors import KafkaWriteFailed
from consumer.metrics import Metrics

ORIGIN = ("perkamo.events", 2, 41)
BUDGET = budget_of(65_536)


class RefusingProducer:
    """Records what it took; fails each topic's first `transient[topic]` tries (a broker
    outage) and refuses `permanent` topics outright (Kafka refusing the message itself)."""

    def __init__(self, transient: dict[str, int] | None = None, permanent: set[str] | None = None) -> None:
        self.transient = dict(transient or {})
        self.permanent = permanent or set()
        self.taken: list[Outgoing] = []
        self.tries = 0

    async def publish(self, topic: str, value: bytes | None, key: Any = None, headers: Any = None) -> Any:
        self.tries += 1
        await asyncio.sleep(0)
        if topic in self.permanent:
            raise KafkaWriteFailed(topic, 10, "MSG_SIZE_TOO_LARGE", "Broker: Message size too large", True)
        if self.transient.get(topic, 0) > 0:
            self.transient[topic] -= 1
            raise KafkaWriteFailed(topic, -192, "_MSG_TIMED_OUT", "Local: Message timed out", False)
        self.taken.append(Outgoing(topic, value, key, headers))
        return object()


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(durable, "BACKOFF_FIRST_S", 0.001)
    monkeypatch.setattr(durable, "BACKOFF_MAX_S", 0.002)


def publisher(producer: RefusingProducer) -> tuple[DurablePublisher, Metrics]:
    metrics = Metrics()
    return DurablePublisher(producer, metrics, BUDGET), metrics  # type: ignore[arg-type]


def value_of(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(f"perkamo_webhook_{name}", labels or None) or 0.0


async def test_a_transient_failure_is_tried_again_until_taken_and_nothing_else_is_published() -> None:
    producer = RefusingProducer(transient={c.ATTEMPTS_TOPIC: 5})
    out, metrics = publisher(producer)
    record = Outgoing(c.ATTEMPTS_TOPIC, b"{}", "dlv_1", None, "attempt record")
    retry = Outgoing("perkamo.webhooks.retry.1s", b"{}", "dlv_1", [], "retry")
    await out.publish_all([record, retry], ORIGIN)
    assert sorted(o.topic for o in producer.taken) == sorted([c.ATTEMPTS_TOPIC, retry.topic])
    assert not any(o.topic == c.DLQ_TOPIC for o in producer.taken)  # never dead-lettered
    assert value_of(metrics, "kafka_write_retries_total", topic=c.ATTEMPTS_TOPIC) == 5
    assert out.writes_waiting == 0
    assert value_of(metrics, "kafka_writes_waiting") == 0


async def test_while_kafka_cannot_take_a_write_the_publisher_says_so() -> None:
    producer = RefusingProducer(transient={c.ATTEMPTS_TOPIC: 10**9})
    out, metrics = publisher(producer)
    task = asyncio.create_task(out.publish(Outgoing(c.ATTEMPTS_TOPIC, b"{}", "k"), ORIGIN))
    while producer.tries < 3:
        await asyncio.sleep(0.001)
    assert out.writes_waiting == 1
    assert value_of(metrics, "kafka_writes_waiting") == 1
    task.cancel()  # a drain deadline: the offset stays uncommitted, nothing is dead-lettered
    with pytest.raises(asyncio.CancelledError):
        await task
    assert out.writes_waiting == 0
    assert producer.taken == []


async def test_a_refused_message_becomes_a_stub_dead_letter_and_is_counted(caplog: Any) -> None:
    producer = RefusingProducer(permanent={c.ATTEMPTS_TOPIC})
    out, metrics = publisher(producer)
    value = b'"' * 10_000
    with caplog.at_level(logging.ERROR, "consumer.durable"):
        taken = await out.publish(
            Outgoing(c.ATTEMPTS_TOPIC, value, "dlv_9", [("x-app", b"1")], "attempt record"), ORIGIN
        )
    assert taken is None
    [stub] = producer.taken
    headers = dict(stub.headers or [])
    assert stub.topic == c.DLQ_TOPIC
    assert stub.key == "dlv_9"
    assert stub.value == value[:STUB_HEAD_BYTES]
    assert headers[c.K_DLQ_REASON] == b"unpublishable"
    assert headers[c.K_STUB_OF_TOPIC] == c.ATTEMPTS_TOPIC.encode()
    assert headers[c.K_VALUE_BYTES] == b"10000"
    assert headers[c.K_VALUE_SHA256] == hashlib.sha256(value).hexdigest().encode()
    assert (headers[c.K_ORIGIN_TOPIC], headers[c.K_ORIGIN_PARTITION], headers[c.K_ORIGIN_OFFSET]) == (
        b"perkamo.events", b"2", b"41")
    assert headers["x-app"] == b"1"
    assert b"MSG_SIZE_TOO_LARGE" in headers[c.K_DLQ_DETAIL]
    assert value_of(metrics, "unpublishable_total", topic=c.ATTEMPTS_TOPIC) == 1
    assert value_of(metrics, "dead_lettered_total", reason="unpublishable") == 1
    assert "unpublishable attempt record for perkamo.webhooks.attempts" in caplog.text


async def test_a_value_over_the_budget_is_not_tried_and_a_dead_letter_keeps_its_own_reason() -> None:
    producer = RefusingProducer()
    out, metrics = publisher(producer)
    value = b"x" * (BUDGET.message_max_bytes + 1)
    letter = Outgoing(c.DLQ_TOPIC, value, b"k", [(c.K_DLQ_REASON, b"oversized"),
                                                   (c.K_DLQ_DETAIL, b"N bytes > limit")], "dead letter")
    assert await out.publish(letter, ORIGIN) is None
    [stub] = producer.taken
    headers = dict(stub.headers or [])
    assert producer.tries == 1  # only the stub: the whole value was never offered to Kafka
    assert headers[c.K_DLQ_REASON] == b"oversized"
    assert headers[c.K_DLQ_DETAIL].startswith(b"N bytes > limit; dead letter for")
    assert len(stub.value or b"") == STUB_HEAD_BYTES
    assert value_of(metrics, "unpublishable_total", topic=c.DLQ_TOPIC) == 0
    assert value_of(metrics, "dead_lettered_total", reason="oversized") == 1


async def test_a_value_at_the_budget_is_published_whole() -> None:
    producer = RefusingProducer()
    out, _ = publisher(producer)
    value = b"x" * (BUDGET.message_max_bytes - 10)
    assert await out.publish(Outgoing(c.DLQ_TOPIC, value, b"k", [("h", b"123456789")]), ORIGIN) is not None
    assert producer.taken[0].value == value


async def test_when_even_the_stub_is_refused_the_offset_is_released_with_an_error(caplog: Any) -> None:
    producer = RefusingProducer(permanent={c.ATTEMPTS_TOPIC, c.DLQ_TOPIC})
    out, _ = publisher(producer)
    with caplog.at_level(logging.ERROR, "consumer.durable"):
        assert await out.publish(Outgoing(c.ATTEMPTS_TOPIC, b"{}", "k"), ORIGIN) is None
    assert "was refused too" in caplog.text
    assert producer.taken == []


def test_kept_headers_are_cut_to_their_room() -> None:
    many = [(f"h{i}", b"v" * 1000) for i in range(20)]
    kept = durable.cut_headers(many, 4096)
    assert kept == many[:4]
    assert durable.headers_size(kept) <= 4096
