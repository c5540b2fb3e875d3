"""Issue 13, item 4: bounded by construction. Label values from input are bounded, per-endpoint
state is dropped when an endpoint goes away, status and error text are capped in history."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import generate_latest

from consumer.constants import ERROR_MAX, STATUS_TEXT_MAX
from consumer.history import TABLE, HistoryStore
from consumer.metrics import OTHER, Metrics
from tests.support import event_rows, make_event, produce, unique, wait_for
from tests.test_queries import attempt
from tests.test_registry import follow_fixture  # noqa: F401 - fixture
from tests.test_security import publish_record


def test_twenty_thousand_spaces_and_event_types_keep_metrics_small() -> None:
    # Measured: 20k slugs in no_endpoint_total and 20k event types in attempts_total made a
    # 6.9 MB /metrics that took 1.4 s to render.
    metrics = Metrics(max_label_values=100)
    metrics.spaces.add_known("known")  # a Space of the endpoint registry
    for n in range(20_000):
        metrics.no_endpoint.labels(f"space-{n}").inc()
        metrics.child(metrics.attempts, "known", f"type.{n}", "delivered").inc()
        metrics.child(metrics.attempt_duration, f"space-{n}").observe(0.1)
    started = time.monotonic()
    body = generate_latest(metrics.registry)
    took = time.monotonic() - started
    assert len(body) < 200_000, len(body)
    assert took < 0.3, took
    text = body.decode()
    assert f'space="{OTHER}"' in text and f'event_type="{OTHER}"' in text
    assert metrics.registry.get_sample_value(
        "perkamo_webhook_no_endpoint_total", {"space": OTHER}) == 20_000 - 100
    assert len(metrics._children) < 500  # the child cache is bounded as well


def test_known_spaces_and_event_types_always_pass() -> None:
    metrics = Metrics(max_label_values=2, event_types=["purchase.completed"])
    for n in range(10):
        metrics.no_endpoint.labels(f"noise-{n}").inc()
        metrics.child(metrics.attempts, "s", f"noise.{n}", "delivered").inc()
    metrics.spaces.add_known("big-customer")
    metrics.no_endpoint.labels("big-customer").inc()
    metrics.child(metrics.attempts, "s", "purchase.completed", "delivered").inc()
    get = metrics.registry.get_sample_value
    assert get("perkamo_webhook_no_endpoint_total", {"space": "big-customer"}) == 1
    assert get("perkamo_webhook_attempts_total",
               {"space": "s", "event_type": "purchase.completed", "outcome": "delivered"}) == 1


def test_forget_space_drops_the_spaces_delivery_series() -> None:
    metrics = Metrics(max_label_values=3)
    for space in ("a", "b"):
        metrics.spaces.add_known(space)
        metrics.child(metrics.attempts, space, "t", "delivered").inc()
        metrics.child(metrics.attempt_duration, space).observe(0.1)
        metrics.circuit_state.labels(space).set(1)
    assert metrics.forget_space("a") == 3
    text = generate_latest(metrics.registry).decode()
    assert 'space="a"' not in text and 'space="b"' in text
    # The Space has no endpoint now: its events are counted as such, under its own name.
    metrics.no_endpoint.labels("a").inc()
    assert metrics.registry.get_sample_value("perkamo_webhook_no_endpoint_total", {"space": "a"}) == 1


async def test_unknown_spaces_from_kafka_fold_into_other(harness: Any) -> None:
    # The real loop (service.py untouched) labels no_endpoint_total through the bounded metric.
    app = await harness.start(harness.settings(metrics_max_label_values=20))
    prefix = unique("flood")
    produce(harness.kafka, harness.events_topic,
            [orjson.dumps(make_event(f"{prefix}-{n}")) for n in range(120)])

    def counted() -> float:
        text = generate_latest(app.metrics.registry).decode()
        return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
                   if line.startswith("perkamo_webhook_no_endpoint_total{"))

    await wait_for(lambda: counted() >= 120, timeout=30, what="120 events counted")
    text = generate_latest(app.metrics.registry).decode()
    spaces = {line.split('space="')[1].split('"')[0] for line in text.splitlines()
              if line.startswith("perkamo_webhook_no_endpoint_total{")}
    assert OTHER in spaces and len(spaces) <= 21


async def test_removed_endpoint_state_is_dropped(harness: Any, receiver: Any, follow: Any) -> None:
    app = await harness.start(harness.settings())
    await follow(app)
    space = unique("gone")
    publish_record(harness.kafka, space, {"space": space, "url": receiver.url("/gone")})
    await wait_for(lambda: app.registry.get(space) is not None, what="endpoint applied")
    endpoint = app.registry.get(space)
    assert endpoint is not None
    produce(harness.kafka, harness.events_topic, [orjson.dumps(make_event(space))])
    await wait_for(lambda: receiver.to("/gone"), what="delivery")
    deliverer, gates = app.service.ctx.deliverer, app.service.gates
    await wait_for(lambda: gates.find(endpoint.id) is not None, what="per-endpoint state (its gate)")

    def series() -> list[str]:
        return [line for line in generate_latest(app.metrics.registry).decode().splitlines()
                if f'space="{space}"' in line and not line.startswith("#")]

    await wait_for(series, what="the Space's series")
    publish_record(harness.kafka, space, b"")  # not JSON: the newest record removes the Space
    await wait_for(lambda: app.registry.get(space) is None, what="endpoint removed")
    await wait_for(lambda: gates.find(endpoint.id) is None and len(gates) == 0,
                   what="per-endpoint state dropped")
    await wait_for(lambda: not series(), what="the Space's series dropped")
    assert endpoint.host not in deliverer._vetted


async def test_a_huge_reason_phrase_is_capped_in_history(harness: Any, receiver: Any) -> None:
    # Measured: the reason phrase was stored uncapped.
    space = unique("reason")

    async def long_reason(_: web.Request, __: int) -> web.StreamResponse:
        return web.Response(status=500, reason="R" * 5000)

    receiver.on("/reason", long_reason)
    await harness.start(harness.settings([{"space": space, "url": receiver.url("/reason")}],
                                         retry_tiers=["1m"]))
    event = make_event(space)
    produce(harness.kafka, harness.events_topic, [orjson.dumps(event)])

    def row() -> Any:
        rows = event_rows(harness.store, event["id"], ("length(status_text)", "status_code"))
        return rows[0] if rows else None

    length, code = await wait_for(row, timeout=30, what="the attempt row")
    assert code == 500 and length == STATUS_TEXT_MAX


def test_status_text_and_error_are_capped_where_rows_enter_history(store: HistoryStore) -> None:
    space = unique("cap")
    store.insert([attempt(f"{space}-d", 1, space, "failed", datetime.now(UTC),
                          status_text="S" * 9000, error="E" * 9000)])
    _, rows = store.query(f"SELECT length(status_text), length(error) FROM {TABLE} FINAL "
                          "WHERE space_slug = {s:String}", {"s": space})
    assert rows == [(STATUS_TEXT_MAX, ERROR_MAX)]
