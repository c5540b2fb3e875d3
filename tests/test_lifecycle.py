"""Retries that really retry: an open circuit holds deliveries without spending their attempts.

Real broker, embedded ClickHouse, HTTPS receivers on loopback. Every test checks the promise
under the protection: attempt numbers a receiver sees run 1, 2, 3... without gaps, history's
attempts are exactly the calls made, and nothing is lost.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from typing import Any

import orjson
from aiohttp import web

from consumer import constants as c
from consumer.endpoints import endpoint_id_for
from consumer.history import TABLE
from consumer.kafka_topics import ensure_topics
from consumer.models import delivery_id_for
from consumer.topics import plan
from tests.support import (
    end_offsets,
    fast_forward_group,
    latest_status,
    make_event,
    produce,
    read_topic,
    status,
    unique,
    wait_for,
)
from tests.test_history_api import TOKEN, Api


def seen_attempts(receiver: Any, path: str) -> dict[str, list[int]]:
    """Per delivery id, the x-perkamo-attempt numbers the receiver saw, in arrival order."""
    out: dict[str, list[int]] = defaultdict(list)
    for request in receiver.to(path):
        out[request.headers["x-perkamo-delivery"]].append(int(request.headers["x-perkamo-attempt"]))
    return dict(out)


def history(harness: Any, space: str) -> dict[str, list[tuple[int, str]]]:
    """Per delivery id, its attempt rows (attempt > 0) as (attempt, status), in order."""
    _, rows = harness.store.query(
        f"SELECT delivery_id, attempt, status FROM {TABLE} FINAL "
        "WHERE space_slug = {s:String} AND attempt > 0 ORDER BY delivery_id, attempt",
        {"s": space},
    )
    out: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for delivery_id, attempt, st in rows:
        out[delivery_id].append((attempt, st))
    return dict(out)


def final_status(harness: Any, space: str) -> dict[str, str]:
    """Per delivery id, the status of its newest row (hold records included)."""
    return latest_status(harness.store, space, key="delivery_id")


def assert_gapless(receiver: Any, path: str, harness: Any, space: str) -> dict[str, list[int]]:
    seen = seen_attempts(receiver, path)
    rows = history(harness, space)
    for delivery_id, numbers in seen.items():
        assert numbers == list(range(1, len(numbers) + 1)), (delivery_id, numbers)
        assert [a for a, _ in rows.get(delivery_id, [])] == numbers, (delivery_id, rows.get(delivery_id))
    assert set(rows) <= set(seen)  # no attempt row without a call
    return seen


def outage(seconds: float) -> Any:
    """503 for `seconds` after the first request, then 204."""
    started: list[float] = []

    async def answer(_: web.Request, __: int) -> web.StreamResponse:
        if not started:
            started.append(time.monotonic())
        return web.Response(status=503 if time.monotonic() - started[0] < seconds else 204)

    answer.started = started  # type: ignore[attr-defined]
    return answer


def with_tiers(harness: Any, tiers: list[str]) -> None:
    """Create these tiers' topics and skip what earlier tests left in them."""
    settings = harness.settings(retry_tiers=tiers)
    specs, _ = plan(settings, partitions=3, retention_hours=None)
    ensure_topics(harness.kafka, [(s.name, s.partitions, s.config) for s in specs])
    fast_forward_group(harness.kafka, harness.group, [s.name for s in specs if ".retry." in s.name])


async def test_an_outage_during_a_burst_costs_no_attempts(harness, receiver):
    """The issue's case: 40 events at once, the endpoint answers 503 for 3 s, tiers 1s,2s,4s,8s,
    every breaker setting at its default. All 40 are delivered, none dead-lettered."""
    space = unique("burst")
    tiers = ["1s", "2s", "4s", "8s"]
    with_tiers(harness, tiers)
    answer = outage(3.0)
    receiver.on("/hook", answer)
    await harness.start(harness.settings([{"space": space, "url": receiver.url("/hook")}],
                                         retry_tiers=tiers))
    dlq_start = end_offsets(harness.kafka, [c.DLQ_TOPIC])
    events = [make_event(space) for _ in range(40)]
    produce(harness.kafka, harness.events_topic, [orjson.dumps(e) for e in events])
    ids = {delivery_id_for(e["id"], endpoint_id_for(space)) for e in events}

    def all_delivered() -> bool:
        finals = final_status(harness, space)
        return len(finals) == 40 and set(finals.values()) == {c.STATUS_DELIVERED}

    await wait_for(all_delivered, timeout=60, interval=0.25, what="all 40 delivered")
    seen = assert_gapless(receiver, "/hook", harness, space)
    assert set(seen) == ids
    dead = [m for m in read_topic(harness.kafka, c.DLQ_TOPIC, since=dlq_start)
            if (m.key() or b"").decode() in ids]
    assert dead == []
    # Recovery: from the endpoint's recovery, and from the probe that closed the circuit.
    requests = receiver.to("/hook")
    recovered = answer.started[0] + 3.0
    first_ok = min(r.at for r in requests if r.at - requests[0].at >= 3.0)
    last_per_delivery = {}
    for request in requests:
        last_per_delivery[request.headers["x-perkamo-delivery"]] = request.at
    after_probe = sorted(t - first_ok for t in last_per_delivery.values() if t >= first_ok)
    print(f"\nFIGURE burst: {len(requests)} calls; held deliveries delivered after the closing "
          f"probe p50 {statistics.median(after_probe) * 1000:.0f} ms, max {max(after_probe) * 1000:.0f} ms;"
          f" first success {first_ok - requests[0].at:.2f} s after the first call "
          f"(endpoint healthy from 3 s; monotonic start {recovered:.0f})")
    assert max(after_probe) < 2.0  # released with the probe's ramp, not at their next tier


async def test_an_endpoint_failing_each_deliverys_first_two_calls_recovers_on_attempt_3(harness, receiver):
    space = unique("flaky")
    calls: dict[str, int] = defaultdict(int)

    async def flaky(request: web.Request, _: int) -> web.StreamResponse:
        delivery = request.headers["x-perkamo-delivery"]
        calls[delivery] += 1
        return web.Response(status=503 if calls[delivery] <= 2 else 204)

    receiver.on("/flaky", flaky)
    await harness.start(harness.settings([{"space": space, "url": receiver.url("/flaky")}]))
    events = [make_event(space) for _ in range(5)]
    produce(harness.kafka, harness.events_topic, [orjson.dumps(e) for e in events])

    def done() -> bool:
        finals = final_status(harness, space)
        return len(finals) == 5 and set(finals.values()) == {c.STATUS_DELIVERED}

    await wait_for(done, timeout=40, interval=0.25, what="all 5 delivered")
    seen = assert_gapless(receiver, "/flaky", harness, space)
    assert sorted(seen.values()) == [[1, 2, 3]] * 5


async def test_a_dead_endpoint_fails_every_delivery_with_gapless_attempts_and_few_calls(harness, receiver):
    """Always 503: every delivery ends `failed` (exhausted, or expired while held), its attempt
    numbers gapless; while the circuit is open the endpoint gets only probes."""
    space = unique("dead")
    receiver.on("/dead", status(503))
    settings = harness.settings([{"space": space, "url": receiver.url("/dead")}],
                                breaker_cooldown_s=1.0, breaker_cooldown_max_s=4.0, admin_token=TOKEN)
    await harness.start(settings)
    api = Api(settings)
    start = end_offsets(harness.kafka, [c.DLQ_TOPIC, c.OPERATIONAL_TOPIC])
    events = [make_event(space) for _ in range(30)]
    produce(harness.kafka, harness.events_topic, [orjson.dumps(e) for e in events])
    ids = {delivery_id_for(e["id"], endpoint_id_for(space)) for e in events}

    def all_failed() -> bool:
        finals = final_status(harness, space)
        return len(finals) == 30 and set(finals.values()) == {c.STATUS_FAILED}

    async def open_and_held() -> Any:
        _, doc = await api.get("/endpoints/health")
        health = doc["endpoints"].get(space)
        return health if health and health["state"] == "circuit_open" and health["held"] else None

    health = await wait_for(open_and_held, timeout=20, what="the health API to show it open")
    assert health["circuit"] in ("open", "half_open") and health["failure_rate"] == 1.0
    assert health["last_failure_at"] and health["last_success_at"] is None
    deliver_api = Api(settings, deliver=True)  # the gauges are the deliver role's

    async def gauge_open() -> bool:
        return f'perkamo_webhook_endpoint_health{{space="{space}"}} 3.0' in await deliver_api.metrics()

    await wait_for(gauge_open, timeout=5, what="the health gauge to say circuit open (3)")
    await wait_for(all_failed, timeout=60, interval=0.25, what="all 30 failed")
    assert_gapless(receiver, "/dead", harness, space)
    dead = {m.key().decode(): dict(m.headers()) for m in read_topic(harness.kafka, c.DLQ_TOPIC, since=start)
            if (m.key() or b"").decode() in ids}
    assert set(dead) == ids
    assert {h[c.K_DLQ_REASON] for h in dead.values()} <= {b"exhausted", b"expired"}
    records = [orjson.loads(m.value()) for m in read_topic(harness.kafka, c.OPERATIONAL_TOPIC, since=start)
               if m.key() == space.encode()]
    opened = [r for r in records if r["type"] == "circuit.opened"]
    exhausted = {r["delivery_id"] for r in records if r["type"] == "delivery.exhausted"}
    assert opened and exhausted == ids
    opened_at = time.mktime(time.strptime(opened[0]["at"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
    opened_at += float("0." + opened[0]["at"][20:23])
    span = (1 + 2 + 4) * 1.1
    after = [r for r in receiver.to("/dead") if r.at > opened_at + 0.01]
    # Probes only: cool-downs of 1, 2, 4 s fit at most 3 in the 7.7 s span (plus one at its edge).
    assert len(after) <= 4, [round(r.at - opened_at, 2) for r in after]
    print(f"\nFIGURE dead endpoint: {len(receiver.to('/dead'))} calls for 30 deliveries; "
          f"{len(after)} calls in the {span:.1f} s after the circuit opened")


async def test_resend_and_replay_meet_an_open_circuit_and_go_out_when_it_recovers(harness, receiver):
    """Deliveries exhausted against a refusing handler are resent and replayed while the
    endpoint is down and its circuit open: they are held (no call, no attempt), then delivered
    with the next attempt numbers once it recovers. Calls made == attempts recorded."""
    space = unique("recover")
    state = {"mode": "refuse"}

    async def endpoint(_: web.Request, __: int) -> web.StreamResponse:
        return web.Response(status={"refuse": 400, "down": 503, "up": 204}[state["mode"]])

    tiers = ["1s", "4s"]
    with_tiers(harness, tiers)
    receiver.on("/hook", endpoint)
    settings = harness.settings([{"space": space, "url": receiver.url("/hook")}], retry_tiers=tiers,
                                admin_token=TOKEN, breaker_min_calls=3, breaker_cooldown_s=2.0,
                                breaker_cooldown_max_s=2.0)
    app = await harness.start(settings)
    api = Api(settings)
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 60))
    refused = [make_event(space) for _ in range(4)]
    produce(harness.kafka, harness.events_topic, [orjson.dumps(e) for e in refused])
    ids = [delivery_id_for(e["id"], endpoint_id_for(space)) for e in refused]
    # A refusing handler (400) never opens the circuit: 3 calls each, then failed.
    await wait_for(lambda: len(f := final_status(harness, space)) == 4
                   and set(f.values()) == {c.STATUS_FAILED}, timeout=30, interval=0.25,
                   what="4 failed (exhausted)")
    assert sorted(seen_attempts(receiver, "/hook").values()) == [[1, 2, 3]] * 4

    # Now the endpoint goes down: fresh calls open its circuit once more than half of the calls
    # in the window (the 12 refusals included) find it unavailable.
    state["mode"] = "down"
    trippers = [make_event(space) for _ in range(15)]
    produce(harness.kafka, harness.events_topic, [orjson.dumps(e) for e in trippers])
    gate_id = endpoint_id_for(space)
    await wait_for(lambda: (g := app.service.gates.find(gate_id)) is not None and g.circuit == 1,
                   timeout=20, what="the circuit to open")
    calls_before = len(receiver.to("/hook"))

    def held() -> int:
        finals = final_status(harness, space)
        return sum(1 for d in ids if finals.get(d) == c.STATUS_HELD)

    status_code, doc = await api.post(f"/deliveries/{ids[0]}/resend")
    assert status_code == 202 and doc["attempt"] == 4, doc
    await wait_for(lambda: held() == 1, timeout=20, interval=0.2, what="the resend held")
    status_code, again = await api.post(f"/deliveries/{ids[0]}/resend")
    assert status_code == 409 and "held" in again["error"], again
    # The replay takes the other three: the resent one is `held` now, not `failed`.
    status_code, doc = await api.post("/replay", {"space": space, "since": since, "status": "failed"})
    assert status_code == 202 and doc["published"] == 3, doc
    await wait_for(lambda: held() == 4, timeout=20, interval=0.2, what="the 4 re-published held")
    assert len(receiver.to("/hook")) - calls_before <= 2  # at most a probe meanwhile
    state["mode"] = "up"
    await wait_for(lambda: all(final_status(harness, space).get(d) == c.STATUS_DELIVERED for d in ids),
                   timeout=30, interval=0.2, what="the 4 delivered after recovery")
    seen = assert_gapless(receiver, "/hook", harness, space)
    for delivery_id in ids:
        assert seen[delivery_id] == [1, 2, 3, 4]
    # The calls made since: the probes and one per held delivery, never one per tier while held.
    assert len(receiver.to("/hook")) - calls_before <= 4 + 15 + 3


async def test_a_far_future_due_time_is_dead_lettered_and_never_stalls_its_partition(harness, receiver):
    space = unique("future")
    await harness.start(harness.settings([{"space": space, "url": receiver.url("/ok")}]))
    start = end_offsets(harness.kafka, [c.DLQ_TOPIC])
    hostile, normal = make_event(space), make_event(space)
    topic = "perkamo.webhooks.retry.1s"
    far = str(int(time.time() * 1000) + 10 * 86_400_000).encode()
    produce(harness.kafka, topic, [orjson.dumps(hostile)], partition=0,
            headers=[(c.K_DUE_MS, far), (c.K_ATTEMPT, b"2")])
    now = str(int(time.time() * 1000)).encode()
    produce(harness.kafka, topic, [orjson.dumps(normal)], partition=0,
            headers=[(c.K_DUE_MS, now), (c.K_ATTEMPT, b"2")])
    normal_id = delivery_id_for(normal["id"], endpoint_id_for(space))
    await wait_for(lambda: final_status(harness, space).get(normal_id) == c.STATUS_DELIVERED,
                   timeout=15, what="the message behind it delivered")
    dead = [m for m in read_topic(harness.kafka, c.DLQ_TOPIC, since=start)
            if orjson.loads(m.value())["id"] == hostile["id"]]
    assert len(dead) == 1
    headers = dict(dead[0].headers())
    assert headers[c.K_DLQ_REASON] == b"bad_header"
    assert b"perkamo-due-ms" in headers[c.K_DLQ_DETAIL]
