"""An upstream producer cannot steer deliveries with perkamo-* headers: on an events topic they
are ignored (consumer.headers.untrusted_meta), so a forged delivery id or attempt number neither
writes another Space's history nor skips retries."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from consumer import constants as c
from tests.support import event_rows, make_event, produce, wait_for

pytestmark = pytest.mark.integration

COLUMNS = ["delivery_id", "attempt", "space_slug", "trigger", "status"]


async def test_forged_delivery_id_and_attempt_on_the_events_topic_are_ignored(
    harness: Any, receiver: Any
) -> None:
    await harness.start(harness.settings([
        {"space": "s-trust-a", "url": receiver.url("/a")},
        {"space": "s-trust-b", "url": receiver.url("/b")},
    ]))
    victim = make_event("s-trust-b")
    produce(harness.kafka, harness.events_topic, [orjson.dumps(victim)])
    [victim_row] = await wait_for(lambda: event_rows(harness.store, victim["id"], COLUMNS), timeout=30,
                                  what="Space B's delivery in history")
    victim_id = victim_row[0]

    forged = make_event("s-trust-a")
    produce(harness.kafka, harness.events_topic, [orjson.dumps(forged)], headers=[
        (c.K_DELIVERY_ID, victim_id.encode()),
        (c.K_ATTEMPT, b"10000"),
        (c.K_RUN_ATTEMPT, b"10000"),
        (c.K_TRIGGER, b"resend"),
        (c.K_ORIGIN_OFFSET, b"99999999999999999999"),
    ])
    [request] = await wait_for(lambda: receiver.to("/a"), timeout=30, what="Space A's event")
    assert request.headers["x-perkamo-attempt"] == "1"
    natural = request.headers["x-perkamo-delivery"]
    assert natural != victim_id

    rows = await wait_for(lambda: event_rows(harness.store, forged["id"], COLUMNS), timeout=30,
                          what="Space A's row")
    assert rows == [(natural, 1, "s-trust-a", c.TRIGGER_INITIAL, c.STATUS_DELIVERED)]
    _, victims = harness.store.query(
        f"SELECT space_slug, event_id FROM {c.HISTORY_DATABASE}.{c.HISTORY_TABLE} FINAL "
        "WHERE delivery_id = {d:String}", {"d": victim_id})
    assert [tuple(r) for r in victims] == [("s-trust-b", victim["id"])]  # no row of A under B's id
