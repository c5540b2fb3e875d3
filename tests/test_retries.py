"""Retries through delay-tier topics on the real broker (tiers 1s,2s,4s)."""

from __future__ import annotations

import asyncio
import math
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import orjson
from aiohttp import web

from consumer import constants as c
from consumer.history import TABLE
from consumer.retry_policy import tier_topic
from tests.support import (
    end_offsets,
    event_rows,
    latest_status,
    make_event,
    produce,
    read_topic,
    sequence,
    status,
    unique,
    wait_for,
)

TIERS = [("1s", 1.0), ("2s", 2.0), ("4s", 4.0)]


def _rows(harness, event_id):
    return event_rows(harness.store, event_id, ("attempt", "status", "trigger", "status_code",
                                                "attempted_at", "next_attempt_at", "delivery_id",
                                                "error_kind"))


async def test_always_failing_delivery_walks_every_tier_then_dead_letters(harness, receiver):
    receiver.on("/down", status(500))
    await harness.start(harness.settings([{"space": "s-walk", "url": receiver.url("/down")}]))
    dlq_before = end_offsets(harness.kafka, [c.DLQ_TOPIC])
    event = make_event("s-walk")
    produce(harness.kafka, harness.events_topic, [orjson.dumps(event)])
    rows = await wait_for(
        lambda: (r := _rows(harness, event["id"])) and r[-1][1] == c.STATUS_FAILED and r,
        timeout=40,
        what="the final failed row",
    )
    assert [r[0] for r in rows] == [1, 2, 3, 4]
    assert [r[1] for r in rows] == [c.STATUS_RETRYING] * 3 + [c.STATUS_FAILED]
    assert [r[2] for r in rows] == [c.TRIGGER_INITIAL, c.TRIGGER_RETRY, c.TRIGGER_RETRY, c.TRIGGER_RETRY]
    assert len({r[6] for r in rows}) == 1
    # Each retry happens after its due time (never early), and its due time is the tier's
    # delay plus at most 10 % jitter after the failure.
    for (prev, nxt), (_, delay) in zip(zip(rows, rows[1:]), TIERS, strict=True):
        due = prev[5]
        assert timedelta(seconds=delay) <= due - prev[4] <= timedelta(seconds=delay * 1.1 + 0.01)
        assert nxt[4] >= due
    assert rows[-1][5] is None
    attempts = [r.headers["x-perkamo-attempt"] for r in receiver.to("/down")]
    assert attempts == ["1", "2", "3", "4"]
    dead = [
        m
        for m in read_topic(harness.kafka, c.DLQ_TOPIC, since=dlq_before, timeout=10)
        if dict(m.headers()).get(c.K_DELIVERY_ID) == rows[0][6].encode()
    ]
    assert len(dead) == 1
    headers = dict(dead[0].headers())
    assert headers[c.K_DLQ_REASON] == b"exhausted"
    assert headers[c.K_ORIGIN_TOPIC] == harness.events_topic.encode()
    assert dead[0].value() == orjson.dumps(event)


async def test_retry_message_headers_are_rebuilt_with_one_value_each(harness, receiver):
    receiver.on("/flaky", sequence(500, 500, 204))
    await harness.start(harness.settings([{"space": "s-hdr", "url": receiver.url("/flaky")}]))
    before = end_offsets(harness.kafka, [tier_topic("2s")])
    event = make_event("s-hdr")
    produce(harness.kafka, harness.events_topic, [orjson.dumps(event)])
    rows = await wait_for(
        lambda: (r := _rows(harness, event["id"])) and r[-1][1] == c.STATUS_DELIVERED and r,
        timeout=30,
        what="delivery on attempt 3",
    )
    assert [r[0] for r in rows] == [1, 2, 3]
    assert len({r[6] for r in rows}) == 1
    ids = {r.headers["x-perkamo-delivery"] for r in receiver.to("/flaky")}
    assert ids == {rows[0][6]}
    msgs = [
        m
        for m in read_topic(harness.kafka, tier_topic("2s"), since=before, timeout=10)
        if dict(m.headers()).get(c.K_DELIVERY_ID) == rows[0][6].encode()
    ]
    assert len(msgs) == 1
    names = [k for k, _ in msgs[0].headers()]
    assert len(names) == len(set(names))
    headers = dict(msgs[0].headers())
    assert headers[c.K_ATTEMPT] == b"3"
    assert headers[c.K_ERROR_KIND] == b"http_status" and headers[c.K_STATUS_CODE] == b"500"
    assert headers[c.K_ORIGIN_TOPIC] == harness.events_topic.encode()
    assert int(headers[c.K_FIRST_FAILED_MS]) <= int(headers[c.K_DUE_MS]) - 2000


async def test_fresh_events_flow_while_a_tier_partition_waits(harness, receiver):
    receiver.on("/fails-once", sequence(500, 204))
    await harness.start(
        harness.settings(
            [
                {"space": "s-wait", "url": receiver.url("/fails-once")},
                {"space": "s-flow", "url": receiver.url("/flow")},
            ],
            retry_tiers=["4s"],
        )
    )
    waiting = make_event("s-wait")
    produce(harness.kafka, harness.events_topic, [orjson.dumps(waiting)])
    await wait_for(lambda: receiver.to("/fails-once"), what="the first failure")
    failed_at = time.time()
    for _ in range(10):  # while the 4s tier waits, fresh events are delivered at once
        sent = time.time()
        produce(harness.kafka, harness.events_topic, [orjson.dumps(make_event("s-flow"))])
        n = len(receiver.to("/flow"))
        await wait_for(lambda n=n: len(receiver.to("/flow")) > n, timeout=3, what="a fresh delivery")
        # Well under the 4 s the tier waits (loose enough for a busy 2-core machine).
        assert receiver.to("/flow")[-1].at - sent < 2.0
    await wait_for(lambda: len(receiver.to("/fails-once")) == 2, timeout=10, what="the retry")
    assert receiver.to("/fails-once")[1].at - failed_at >= 4.0


async def test_retry_after_picks_the_first_tier_not_shorter(harness, receiver):
    receiver.on("/busy", sequence(429, 204))

    async def unavailable(_req, n):
        if n:
            return web.Response(status=204)
        # An HTTP date has whole seconds: 3-4 s from now, so longer than the 2s tier.
        when = datetime.fromtimestamp(math.floor(time.time()) + 4, UTC)
        return web.Response(status=503, headers={"Retry-After": format_datetime(when, usegmt=True)})

    receiver.on("/busy", lambda req, n: _retry_after_seconds(n))
    receiver.on("/maint", unavailable)
    await harness.start(
        harness.settings(
            [
                {"space": "s-ra", "url": receiver.url("/busy")},
                {"space": "s-rad", "url": receiver.url("/maint")},
            ]
        )
    )
    by_seconds, by_date = make_event("s-ra"), make_event("s-rad")
    produce(harness.kafka, harness.events_topic, [orjson.dumps(by_seconds), orjson.dumps(by_date)])
    for event, tier_seconds in ((by_seconds, 2.0), (by_date, 4.0)):
        rows = await wait_for(
            lambda e=event: (r := _rows(harness, e["id"])) and r[-1][1] == c.STATUS_DELIVERED and r,
            timeout=30,
            what=f"delivery after Retry-After: {_rows(harness, event['id'])}",
        )
        first = rows[0]
        wait = (first[5] - first[4]).total_seconds()
        assert tier_seconds <= wait <= tier_seconds * 1.1 + 0.01, (event["data"]["space"]["slug"], wait)


async def _retry_after_seconds(n):
    if n == 0:
        return web.Response(status=429, headers={"Retry-After": "2"})  # 1s is shorter: the 2s tier
    return web.Response(status=204)


async def test_not_due_retry_messages_are_not_skipped_after_pause(harness, receiver):
    """The batch-consume trap: pausing on one message must not drop the rest of its batch."""
    space = "s-trap"
    await harness.start(harness.settings([{"space": space, "url": receiver.url("/trap")}]))
    now_ms = int(time.time() * 1000)
    events = [make_event(space) for _ in range(30)]
    topic = tier_topic("1s")
    # One partition of the tier: the first message is due in 2 s, the 29 behind it are due
    # already. They arrive in one batch; the consumer must pause on the first and seek back.
    for i, event in enumerate(events):
        due = now_ms + 2000 if i == 0 else now_ms - 1000
        produce(
            harness.kafka,
            topic,
            [orjson.dumps(event)],
            partition=2,
            headers=[
                (c.K_DELIVERY_ID, f"dlv_trap_{unique('x')}".encode()),
                (c.K_ATTEMPT, b"2"),
                (c.K_DUE_MS, str(due).encode()),
            ],
        )
    await wait_for(lambda: len(receiver.to("/trap")) >= 30, timeout=20, what="all 30 retries")
    await asyncio.sleep(1)
    arrived = receiver.to("/trap")
    assert len(arrived) == 30
    assert arrived[0].at * 1000 >= now_ms + 2000  # the head waited until due...
    bodies = [orjson.loads(r.body)["id"] for r in arrived]
    assert sorted(bodies) == sorted(e["id"] for e in events)  # ...and nothing behind it was lost


async def test_a_second_consumer_joining_mid_retry_loses_nothing(harness, receiver):
    receiver.on("/rebalance", sequence(500, 204))
    settings = harness.settings([{"space": "s-rb", "url": receiver.url("/rebalance")}], retry_tiers=["2s"])
    first = await harness.start(settings)
    events = [make_event("s-rb") for _ in range(30)]
    produce(harness.kafka, harness.events_topic, [orjson.dumps(e) for e in events])
    await wait_for(
        lambda: len({orjson.loads(r.body)["id"] for r in receiver.to("/rebalance")}) == 30,
        timeout=20,
        what="every first attempt",
    )
    second = await harness.start(
        harness.settings([{"space": "s-rb", "url": receiver.url("/rebalance")}], retry_tiers=["2s"])
    )

    def delivered():
        _, rows = harness.store.query(
            f"SELECT count(DISTINCT event_id) FROM {TABLE} FINAL "
            "WHERE space_slug = 's-rb' AND status = 'delivered'"
        )
        return rows[0][0] == 30

    await wait_for(delivered, timeout=40, what="every event delivered after the rebalance")
    for app in (first, second):
        await wait_for(
            lambda app=app: not any(st.reasons for st in app.service._parts),
            timeout=10,
            what="no partition left paused",
        )


async def test_hanging_endpoint_does_not_delay_healthy_ones_and_the_breaker_cycles(harness, receiver):
    hang = asyncio.Event()

    async def hanging(_req, _n):
        if not hang.is_set():
            await asyncio.sleep(30)
        return web.Response(status=204)

    receiver.on("/hang", hanging)
    app = await harness.start(
        harness.settings(
            [
                {"space": "s-hang", "url": receiver.url("/hang")},
                {"space": "s-healthy", "url": receiver.url("/fine")},
            ],
            delivery_timeout_s=3.0,
            breaker_min_calls=3,
            breaker_cooldown_s=3.0,
            retry_tiers=["1s", "2s", "4s"],
        )
    )
    hanging_events = [make_event("s-hang") for _ in range(6)]
    produce(harness.kafka, harness.events_topic, [orjson.dumps(e) for e in hanging_events])
    latencies = []
    for _ in range(20):
        sent = time.time()
        produce(harness.kafka, harness.events_topic, [orjson.dumps(make_event("s-healthy"))])
        n = len(receiver.to("/fine"))
        await wait_for(lambda n=n: len(receiver.to("/fine")) > n, timeout=5, what="a healthy delivery")
        latencies.append(receiver.to("/fine")[-1].at - sent)
    # Healthy deliveries never wait for the hanging endpoint's 3 s timeouts.
    assert max(latencies) < 2.0, latencies

    metrics = app.metrics
    held = metrics.child(metrics.holds, "circuit_open")
    await wait_for(lambda: held._value.get() >= 1, timeout=20, what="the breaker to open and hold")
    endpoint_id = app.registry.get("s-hang").id
    assert app.service.gates.find(endpoint_id).circuit != 0
    hang.set()  # the endpoint recovers: after the cool-down a probe succeeds and the ramp closes it
    late = make_event("s-hang")
    produce(harness.kafka, harness.events_topic, [orjson.dumps(late)])

    def finals():
        latest = latest_status(harness.store, "s-hang")
        return {e: st for e, st in latest.items() if st not in (c.STATUS_RETRYING, c.STATUS_HELD)}

    # Every event that met the hanging endpoint ends delivered, or failed once its run outlived
    # the schedule's span (7.7 s with these tiers) while held; none is lost.
    done = await wait_for(
        lambda: len(f := finals()) == 7 and f, timeout=40, what="every hanging event's outcome"
    )
    assert set(done) == {e["id"] for e in [*hanging_events, late]}
    assert done[late["id"]] == c.STATUS_DELIVERED
    # A ramping circuit of a quiet endpoint closes PERKAMO_BREAKER_RAMP_S after its first success.
    await wait_for(lambda: app.service.gates.find(endpoint_id).circuit == 0, timeout=10,
                   what="the circuit to close")
    # Attempt numbers are exactly the calls: 1, 2, ... without gaps, as the receiver saw them.
    for event in hanging_events:
        rows = _rows(harness, event["id"])
        attempts = [r[0] for r in rows if r[0] > 0]
        assert attempts == list(range(1, len(attempts) + 1)), rows


async def test_a_resend_after_exhausted_tiers_walks_the_tiers_again(harness, receiver):
    """Attempt numbers continue after a resend, but the tiers start over for the new run."""
    receiver.on("/still-down", status(500))
    await harness.start(
        harness.settings([{"space": "s-resend", "url": receiver.url("/still-down")}], retry_tiers=["1s"])
    )
    event = make_event("s-resend")
    produce(  # as the history role re-publishes a resend: on the redeliver topic, which it owns
        harness.kafka,
        c.REDELIVER_TOPIC,
        [orjson.dumps(event)],
        headers=[
            (c.K_DELIVERY_ID, b"dlv_resend_walks_tiers"),
            (c.K_ATTEMPT, b"5"),
            (c.K_RUN_ATTEMPT, b"1"),
            (c.K_TRIGGER, b"resend"),
        ],
    )
    rows = await wait_for(
        lambda: (r := _rows(harness, event["id"])) and r[-1][1] == c.STATUS_FAILED and r,
        timeout=30,
        what="the resend run to end",
    )
    assert [(r[0], r[1], r[2]) for r in rows] == [
        (5, c.STATUS_RETRYING, "resend"),
        (6, c.STATUS_FAILED, "retry"),
    ]


async def test_a_slow_endpoints_full_queue_is_held_without_using_attempts(harness, receiver):
    """A slow endpoint holds at most its connections plus a queue of twice that; beyond that,
    deliveries are held (the held topic) with the same attempt number. A healthy burst just waits."""
    release = asyncio.Event()

    async def stuck(_req, _n):
        await release.wait()
        return web.Response(status=204)

    receiver.on("/stuck", stuck)
    app = await harness.start(harness.settings(
        [{"space": "s-sat", "url": receiver.url("/stuck")}],
        max_in_flight_per_endpoint=2, delivery_timeout_s=30))
    burst = [make_event("s-sat") for _ in range(6)]
    produce(harness.kafka, harness.events_topic, [orjson.dumps(e) for e in burst], partition=0)
    await wait_for(lambda: len(receiver.to("/stuck")) == 2, what="2 calls in flight")
    await asyncio.sleep(1.5)  # the endpoint is now slow: its oldest call runs past 1 s
    metrics = app.metrics
    saturated = metrics.child(metrics.holds, "endpoint_saturated")
    assert saturated._value.get() == 0  # the burst waited: 2 calls, 4 queued
    late = [make_event("s-sat") for _ in range(3)]
    produce(harness.kafka, harness.events_topic, [orjson.dumps(e) for e in late], partition=0)
    await wait_for(lambda: saturated._value.get() >= 3, timeout=20, what="3 held deliveries")
    assert len(receiver.to("/stuck")) == 2
    assert app.service.gates.find(app.registry.get("s-sat").id).in_flight == 2
    release.set()

    def delivered():
        _, rows = harness.store.query(
            f"SELECT attempt, status FROM {TABLE} FINAL WHERE space_slug = 's-sat' AND attempt > 0 "
            "ORDER BY event_id")
        return rows if len(rows) == 9 else None

    rows = await wait_for(delivered, timeout=30, what="all 9 delivered")
    # Every delivery's only attempt is attempt 1: holding used no attempt.
    assert rows == [(1, "delivered")] * 9
    _, holds = harness.store.query(
        f"SELECT count() FROM {TABLE} FINAL WHERE space_slug = 's-sat' AND attempt = 0 "
        "AND pending_attempt = 1 AND error_kind = 'endpoint_saturated'")
    assert holds[0][0] == 3
