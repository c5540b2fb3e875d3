"""Bad input never stops a partition: each kind reaches the DLQ with its reason; no endpoint is counted."""

from __future__ import annotations

import orjson

from consumer import constants as c
from consumer.history import TABLE
from tests.support import end_offsets, make_event, produce, read_topic, wait_for


async def test_every_bad_input_kind_reaches_the_dlq_with_its_reason(harness, receiver):
    space = "s-dlq"
    app = await harness.start(
        harness.settings([{"space": space, "url": receiver.url("/ok")}], max_payload_bytes=4096)
    )
    before = end_offsets(harness.kafka, [c.DLQ_TOPIC])
    bad_schema = make_event(space)
    bad_schema["data"]["space"]["slug"] = "Not A Slug!"
    oversized = make_event(space)
    oversized["data"]["context"] = {"blob": "x" * 5000}
    good = make_event(space)
    cases = [
        (b"", "empty"),
        (b"{not json", "invalid_json"),
        (b"\xff\xfe\x00garbage", "invalid_json"),
        (orjson.dumps([1, 2, 3]), "schema"),
        (orjson.dumps(bad_schema), "schema"),
        (orjson.dumps(oversized), "oversized"),
    ]
    for value, _ in cases:
        produce(harness.kafka, harness.events_topic, [value], key=b"k", partition=0)
    # A good event behind them on the same partition is still delivered.
    produce(harness.kafka, harness.events_topic, [orjson.dumps(good)], partition=0)
    await wait_for(lambda: receiver.to("/ok"), what="the good event behind the bad ones")

    messages = read_topic(harness.kafka, c.DLQ_TOPIC, since=before, expect=len(cases), timeout=20)
    mine = [m for m in messages if dict(m.headers())[c.K_ORIGIN_TOPIC] == harness.events_topic.encode()]
    reasons = sorted(dict(m.headers())[c.K_DLQ_REASON].decode() for m in mine)
    assert reasons == sorted(r for _, r in cases)
    for msg in mine:
        headers = dict(msg.headers())
        assert headers[c.K_DLQ_DETAIL]
        assert int(headers[c.K_ORIGIN_OFFSET]) >= 0
    values = {m.value() for m in mine}
    assert b"{not json" in values  # the original bytes are kept, nothing is lost
    invalid = {s.labels["reason"]: s.value for s in _samples(app, "perkamo_webhook_invalid_events_total")}
    assert invalid == {"empty": 1, "invalid_json": 2, "schema": 2, "oversized": 1}


async def test_event_for_a_space_without_endpoint_is_counted_not_delivered(harness, receiver):
    app = await harness.start(
        harness.settings(
            [
                {"space": "s-known", "url": receiver.url("/ok")},
                {"space": "s-off", "url": receiver.url("/off"), "active": False},
            ]
        )
    )
    orphan, inactive, known = make_event("s-nobody"), make_event("s-off"), make_event("s-known")
    produce(
        harness.kafka, harness.events_topic, [orjson.dumps(e) for e in (orphan, inactive, known)], partition=0
    )
    await wait_for(lambda: receiver.to("/ok"), what="the known space's delivery")
    await wait_for(
        lambda: (
            {s.labels["space"]: s.value for s in _samples(app, "perkamo_webhook_no_endpoint_total")}
            == {"s-nobody": 1, "s-off": 1}
        ),
        what="no-endpoint counts",
    )
    assert receiver.to("/off") == []
    _, rows = harness.store.query(
        f"SELECT count() FROM {TABLE} WHERE event_id IN ({{a:String}}, {{b:String}})",
        {"a": orphan["id"], "b": inactive["id"]},
    )
    assert rows == [(0,)]


def _samples(app, name):
    for family in app.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name:
                yield sample
