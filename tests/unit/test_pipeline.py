"""The deliver role's per-message steps with fakes (no broker, no network): a recording
producer, a scripted deliverer and real `confluent_kafka.Message` objects, on real gates."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from confluent_kafka import Message

from consumer import constants as c
from consumer import durable
from consumer.breaker import Verdict
from consumer.circuits import CircuitReporter
from consumer.config import load_settings
from consumer.deliver_context import DeliverContext, InFlight, gates_for
from consumer.endpoints import EndpointRegistry, record_of
from consumer.errors import KafkaWriteFailed
from consumer.metrics import Metrics
from consumer.models import AttemptResult, Endpoint, delivery_id_for
from consumer.pipeline import Pipeline
from consumer.retry_policy import tier_topic
from tests.support import make_event

SPACE = "s-unit"
ENDPOINT = Endpoint("ep_unit", SPACE, "https://receiver.example/hook")
EVENTS = "perkamo.events"


@dataclass
class Sent:
    topic: str
    value: bytes | None
    key: Any
    headers: dict[str, bytes]


@dataclass
class RecordingProducer:
    """Takes every message (or refuses the topics in `refuse` for good) and remembers it."""

    sent: list[Sent] = field(default_factory=list)
    refuse: set[str] = field(default_factory=set)

    async def publish(self, topic: str, value: bytes | None, key: Any = None, headers: Any = None) -> Message:
        if topic in self.refuse:
            raise KafkaWriteFailed(topic, 10, "MSG_SIZE_TOO_LARGE", "Broker: Message size too large", True)
        self.sent.append(Sent(topic, value, key, dict(headers or [])))
        return Message(topic=topic, partition=0, offset=len(self.sent), value=value)

    def to(self, topic: str) -> list[Sent]:
        return [s for s in self.sent if s.topic == topic]

    def records(self) -> list[dict[str, Any]]:
        return [orjson.loads(s.value or b"") for s in self.to(c.ATTEMPTS_TOPIC)]


@dataclass
class ScriptedDeliverer:
    """Answers each call with the next result (the last repeats); `calls` records them."""

    results: list[AttemptResult | BaseException] = field(
        default_factory=lambda: [AttemptResult(c.Outcome.DELIVERED, 204)])
    calls: list[tuple[str, str, int]] = field(default_factory=list)

    async def call(self, endpoint: Endpoint, event: Any, delivery_id: str, attempt: int,
                   extra_headers: Any = None) -> AttemptResult:
        self.calls.append((endpoint.url, delivery_id, attempt))
        result = self.results[min(len(self.calls) - 1, len(self.results) - 1)]
        if isinstance(result, BaseException):
            raise result
        return result


@dataclass
class World:
    ctx: DeliverContext
    pipeline: Pipeline
    producer: RecordingProducer
    deliverer: ScriptedDeliverer


@pytest.fixture
def world() -> Iterator[World]:
    settings = load_settings(kafka_bootstrap_servers="127.0.0.1:9", retry_tiers=["1s", "2s"],
                             events_topics=[EVENTS])
    registry = EndpointRegistry([ENDPOINT])
    metrics = Metrics()
    producer, deliverer = RecordingProducer(), ScriptedDeliverer()
    reporter = CircuitReporter(metrics, producer)  # type: ignore[arg-type]
    ctx = DeliverContext(settings, registry, metrics, producer, deliverer,  # type: ignore[arg-type]
                         gates_for(settings, reporter), reporter, InFlight(settings.max_in_flight))
    yield World(ctx, Pipeline(ctx), producer, deliverer)


def message(topic: str = EVENTS, event: dict[str, Any] | None = None, headers: dict[str, bytes] | None = None,
            offset: int = 7, value: bytes | None = None) -> tuple[Message, dict[str, Any]]:
    event = event or make_event(SPACE)
    body = orjson.dumps(event) if value is None else value
    return Message(topic=topic, partition=1, offset=offset, key=b"k", value=body,
                   headers=list((headers or {}).items()) or None), event


def natural(event: dict[str, Any]) -> str:
    return delivery_id_for(event["id"], ENDPOINT.id)


async def test_a_delivered_event_publishes_its_attempt_record_only(world: World) -> None:
    msg, event = message()
    await world.pipeline.handle(msg)
    assert world.deliverer.calls == [(ENDPOINT.url, natural(event), 1)]
    [record] = world.producer.records()
    assert (record["status"], record["attempt"], record["delivery_id"]) == ("delivered", 1, natural(event))
    assert (record["source_topic"], record["source_partition"], record["source_offset"]) == (EVENTS, 1, 7)
    assert [s.topic for s in world.producer.sent] == [c.ATTEMPTS_TOPIC]


async def test_a_failed_attempt_goes_to_the_first_tier_with_the_next_attempt(world: World) -> None:
    world.deliverer.results = [AttemptResult(c.Outcome.HTTP_STATUS, 500, error="500")]
    msg, event = message()
    before = time.time() * 1000
    await world.pipeline.handle(msg)
    [retry] = world.producer.to(tier_topic("1s"))
    assert retry.value == msg.value()
    assert retry.headers[c.K_ATTEMPT] == b"2" and retry.headers[c.K_DELIVERY_ID] == natural(event).encode()
    assert before + 1000 <= int(retry.headers[c.K_DUE_MS]) <= time.time() * 1000 + 1100
    assert [r["status"] for r in world.producer.records()] == ["retrying"]


async def test_the_last_tier_failing_is_dead_lettered_exhausted_with_an_operational_record(
    world: World,
) -> None:
    world.deliverer.results = [AttemptResult(c.Outcome.TIMEOUT, error="timed out")]
    msg, event = message(tier_topic("2s"), headers={
        c.K_DELIVERY_ID: b"dlv_x", c.K_ATTEMPT: b"3", c.K_RUN_ATTEMPT: b"3",
        c.K_DUE_MS: str(int(time.time() * 1000)).encode()})
    await world.pipeline.handle(msg)
    [letter] = world.producer.to(c.DLQ_TOPIC)
    assert letter.headers[c.K_DLQ_REASON] == b"exhausted" and letter.value == msg.value()
    assert len(world.producer.to(c.OPERATIONAL_TOPIC)) == 1
    assert [(r["status"], r["attempt"], r["trigger"]) for r in world.producer.records()] == [
        ("failed", 3, "retry")]


async def test_an_open_circuit_parks_the_delivery_with_its_attempt_unspent(world: World) -> None:
    gate = world.ctx.gates.get(ENDPOINT)
    for _ in range(world.ctx.settings.breaker_min_calls):
        gate.leave(await gate.enter(), Verdict.FAILURE, "http_status")
    msg, event = message()
    await world.pipeline.handle(msg)
    assert world.deliverer.calls == []
    [held] = world.producer.to(c.HELD_TOPIC)
    assert held.headers[c.K_ATTEMPT] == b"1" and held.headers[c.K_HOLD_REASON] == b"circuit_open"
    [record] = world.producer.records()
    assert (record["attempt"], record["pending_attempt"], record["status"]) == (0, 1, "held")


async def test_a_held_delivery_past_its_span_expires_without_a_call(world: World) -> None:
    long_ago = str(int(time.time() * 1000) - 3_600_000).encode()
    msg, event = message(c.HELD_TOPIC, headers={
        c.K_DELIVERY_ID: b"dlv_held", c.K_ATTEMPT: b"2", c.K_RUN_ATTEMPT: b"2",
        c.K_RUN_STARTED_MS: long_ago, c.K_HELD_SINCE_MS: long_ago, c.K_TRIGGER: b"retry"})
    await world.pipeline.handle(msg)
    assert world.deliverer.calls == []
    [letter] = world.producer.to(c.DLQ_TOPIC)
    assert letter.headers[c.K_DLQ_REASON] == b"expired"
    assert letter.headers[c.K_ATTEMPT] == b"2"  # unspent: the same attempt number
    assert [r["status"] for r in world.producer.records()] == ["failed"]


async def test_a_held_delivery_follows_its_space_to_a_new_endpoint(world: World) -> None:
    gate = world.ctx.gates.get(ENDPOINT)
    for _ in range(world.ctx.settings.breaker_min_calls):
        gate.leave(await gate.enter(), Verdict.FAILURE, "http_status")
    now = str(int(time.time() * 1000)).encode()
    msg, event = message(c.HELD_TOPIC, headers={
        c.K_DELIVERY_ID: b"dlv_moved", c.K_ATTEMPT: b"1", c.K_RUN_STARTED_MS: now, c.K_HELD_SINCE_MS: now})
    waiting = asyncio.create_task(world.pipeline.handle(msg))
    await asyncio.sleep(0.05)
    assert world.ctx.in_flight.count == -1  # it gave its in-flight place back while it waits
    moved = Endpoint(ENDPOINT.id, SPACE, "https://new-receiver.example/hook")
    world.ctx.registry.apply(SPACE.encode(), orjson.dumps(record_of(moved)))
    world.ctx.gates.forget(ENDPOINT.id)  # what deliver_role.endpoint_changed does
    await asyncio.wait_for(waiting, 5)
    assert world.deliverer.calls == [(moved.url, "dlv_moved", 1)]
    assert world.ctx.in_flight.count == 0


async def test_a_bad_header_on_a_service_topic_is_dead_lettered_and_not_called(world: World) -> None:
    msg, _ = message(tier_topic("1s"), headers={c.K_ATTEMPT: b"not-a-number"})
    await world.pipeline.handle(msg)
    assert world.deliverer.calls == []
    [letter] = world.producer.to(c.DLQ_TOPIC)
    assert letter.headers[c.K_DLQ_REASON] == b"bad_header" and letter.value == msg.value()


async def test_forged_headers_on_an_events_topic_are_ignored(world: World) -> None:
    msg, event = message(headers={c.K_DELIVERY_ID: b"dlv_other", c.K_ATTEMPT: b"10000"})
    await world.pipeline.handle(msg)
    assert world.deliverer.calls == [(ENDPOINT.url, natural(event), 1)]


async def test_an_unexpected_error_dead_letters_the_message_as_internal(world: World) -> None:
    world.deliverer.results = [RuntimeError("a bug")]
    msg, _ = message()
    await world.pipeline.handle(msg)
    [letter] = world.producer.to(c.DLQ_TOPIC)
    assert letter.headers[c.K_DLQ_REASON] == b"internal_error"


async def test_a_record_kafka_refuses_becomes_a_stub_and_releases_the_message(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(durable, "BACKOFF_FIRST_S", 0.001)
    world.producer.refuse = {c.ATTEMPTS_TOPIC}
    msg, event = message()
    await world.pipeline.handle(msg)  # returns: the offset can be committed
    [stub] = world.producer.to(c.DLQ_TOPIC)
    assert stub.headers[c.K_DLQ_REASON] == b"unpublishable"
    assert stub.headers[c.K_STUB_OF_TOPIC] == c.ATTEMPTS_TOPIC.encode()
    assert world.deliverer.calls  # it was delivered, and is not labelled failed anywhere
    assert not world.producer.to(tier_topic("1s"))
