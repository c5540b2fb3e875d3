"""The v1 delivery contract on the real path: Kafka -> consumer -> HTTPS receiver -> history."""

from __future__ import annotations

import orjson

from consumer import constants as c
from consumer.history import TABLE
from consumer.models import delivery_id_for
from tests.support import make_event, produce, wait_for

CONTRACT_HEADERS = {
    "content-type",
    "user-agent",
    "x-perkamo-delivery",
    "x-perkamo-event",
    "x-perkamo-space",
    "x-perkamo-attempt",
}
HTTP_FRAMING = {"host", "content-length"}


async def test_body_and_headers_are_exactly_the_contract(harness, receiver):
    space = "commerce-live"
    settings = harness.settings([{"space": space, "url": receiver.url("/hook")}])
    await harness.start(settings)
    event = make_event(space)
    # A publisher's own serialization (spaces, key order) must reach the receiver untouched.
    body = orjson.dumps(event, option=orjson.OPT_INDENT_2)
    produce(harness.kafka, harness.events_topic, [body])

    requests = await wait_for(lambda: receiver.to("/hook"), what="the delivery")
    request = requests[0]
    assert request.body == body
    names = [k.decode().lower() for k, _ in request.raw_headers]
    assert len(names) == len(set(names)), "a header was sent twice"
    assert set(names) == CONTRACT_HEADERS | HTTP_FRAMING
    headers = request.headers
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"] == "Perkamo-Webhook/1.0"
    assert headers["x-perkamo-event"] == "purchase.completed"
    assert headers["x-perkamo-space"] == space
    assert headers["x-perkamo-attempt"] == "1"
    endpoint_id = harness.store and __import__("consumer.endpoints", fromlist=["x"]).endpoint_id_for(space)
    assert headers["x-perkamo-delivery"] == delivery_id_for(event["id"], endpoint_id)
    assert int(headers["content-length"]) == len(body)

    rows = await wait_for(
        lambda: harness.store.query(
            f"SELECT status, status_code, attempt, trigger, request_body, endpoint_host, source_topic "
            f"FROM {TABLE} FINAL WHERE event_id = {{e:String}}",
            {"e": event["id"]},
        )[1],
        what="history row",
    )
    assert rows == [
        (c.STATUS_DELIVERED, 204, 1, c.TRIGGER_INITIAL, body.decode(), "localhost", harness.events_topic)
    ]
