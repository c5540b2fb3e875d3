"""Endpoint URLs must be public HTTPS: http:// and private addresses are refused unless allow-listed."""

from __future__ import annotations

import orjson
import pytest

from consumer.deliver_role import build_deliver
from consumer.errors import InvalidEndpoint
from consumer.history import TABLE
from tests.support import make_event, produce, wait_for


def test_http_endpoint_stops_start_up_with_the_setting_named(harness, store):
    settings = harness.settings([{"space": "s-http", "url": "http://example.com/hook"}])
    with pytest.raises(InvalidEndpoint, match="PERKAMO_ENDPOINTS_FILE.*record 0"):
        build_deliver(settings)


async def test_loopback_endpoint_is_refused_without_the_allow_list(harness, receiver):
    space = "s-private"
    await harness.start(
        harness.settings(
            [
                {"space": space, "url": receiver.url("/ok")},
                {"space": space + "-lit", "url": receiver.url("/lit", "127.0.0.1")},
            ],
            allow_private_networks=[],
            retry_tiers=["1m"],
        )
    )
    by_name, by_literal = make_event(space), make_event(space + "-lit")
    produce(harness.kafka, harness.events_topic, [orjson.dumps(by_name), orjson.dumps(by_literal)])
    rows = await _two_rows(harness, by_name["id"], by_literal["id"])
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (space, "blocked_address", 0),
        (space + "-lit", "blocked_address", 0),
    ]
    assert all("loopback" in r[3] for r in rows)
    assert receiver.requests == []  # no connection was made


async def _two_rows(harness, a, b):
    async def ready():
        _, rows = harness.store.query(
            f"SELECT space_slug, error_kind, status_code, error FROM {TABLE} FINAL "
            f"WHERE event_id IN ({{a:String}}, {{b:String}}) ORDER BY space_slug",
            {"a": a, "b": b},
        )
        return rows if len(rows) == 2 else None

    return await wait_for(ready, timeout=30, what="two refused attempts")


async def test_allow_list_opens_loopback(harness, receiver):
    space = "s-allowed"
    await harness.start(
        harness.settings(
            [{"space": space, "url": receiver.url("/ok")}], allow_private_networks=["127.0.0.0/8", "::1/128"]
        )
    )
    produce(harness.kafka, harness.events_topic, [orjson.dumps(make_event(space))])
    await wait_for(lambda: receiver.to("/ok"), what="delivery to an allow-listed address")
