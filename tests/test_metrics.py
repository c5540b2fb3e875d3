"""Metrics scraped over HTTP from the running roles match a scripted scenario exactly."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from consumer.retry_policy import tier_topic
from tests.support import make_event, produce, sequence, status, wait_for


async def scrape(app, history: bool = False) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The deliver role's /metrics (or the history role's)."""
    host, port = app.settings.admin_host_port if history else app.settings.deliver_host_port(0)
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://{host}:{port}/metrics") as response,
    ):
        assert response.status == 200
        text = await response.text()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def pick(samples, name, **labels):
    """Sum of the samples named `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


async def test_scraped_metrics_match_the_scenario(harness, receiver):
    receiver.on("/flaky", sequence(500, 204))
    receiver.on("/down", status(500))
    spaces = {"m-ok": "/ok", "m-flaky": "/flaky", "m-down": "/down"}
    app = await harness.start(
        harness.settings(
            [{"space": s, "url": receiver.url(p)} for s, p in spaces.items()], retry_tiers=["1s"]
        )
    )
    events = [make_event("m-ok") for _ in range(3)] + [
        make_event("m-flaky"),
        make_event("m-down"),
        make_event("m-nobody"),
    ]
    produce(harness.kafka, harness.events_topic, [orjson.dumps(e) for e in events] + [b"{broken"])

    async def settled():
        s = await scrape(app)
        h = await scrape(app, history=True)
        return (
            pick(s, "perkamo_webhook_dead_lettered_total", reason="exhausted") == 1
            and pick(s, "perkamo_webhook_attempts_total", outcome="delivered") == 4
            and pick(h, "perkamo_webhook_history_rows_written_total") == 7
            and (s, h)
        )

    samples, history = await wait_for(settled, timeout=30, what="the scenario to settle")
    ev = harness.events_topic
    assert pick(samples, "perkamo_webhook_events_consumed_total", topic=ev) == 7
    assert pick(samples, "perkamo_webhook_events_consumed_total", topic=tier_topic("1s")) == 2
    assert pick(samples, "perkamo_webhook_attempts_total", space="m-ok", outcome="delivered") == 3
    assert pick(samples, "perkamo_webhook_attempts_total", space="m-flaky", outcome="http_status") == 1
    assert pick(samples, "perkamo_webhook_attempts_total", space="m-flaky", outcome="delivered") == 1
    assert pick(samples, "perkamo_webhook_attempts_total", space="m-down", outcome="http_status") == 2
    assert pick(samples, "perkamo_webhook_attempts_total") == 7
    assert pick(samples, "perkamo_webhook_attempt_duration_seconds_count") == 7
    assert pick(samples, "perkamo_webhook_retries_scheduled_total", tier="1s") == 2
    assert pick(samples, "perkamo_webhook_dead_lettered_total", reason="exhausted") == 1
    assert pick(samples, "perkamo_webhook_dead_lettered_total", reason="invalid_json") == 1
    assert pick(samples, "perkamo_webhook_invalid_events_total", reason="invalid_json") == 1
    assert pick(samples, "perkamo_webhook_no_endpoint_total", space="m-nobody") == 1
    assert pick(history, "perkamo_webhook_history_rows_written_total") == 7
    assert pick(history, "perkamo_webhook_history_records_invalid_total") == 0
    await wait_for(lambda: app.service.in_flight == 0, what="nothing in flight")
    samples = await scrape(app)
    assert pick(samples, "perkamo_webhook_in_flight") == 0
    assert pick(samples, "perkamo_webhook_rebalances_total", kind="assigned") >= 1
    assert pick(samples, "process_resident_memory_bytes") > 0
    # Label values are bounded: no URL, host, path, delivery id or user id anywhere.
    for (_, labels), _ in [*samples.items(), *history.items()]:
        for _, value in labels:
            assert "localhost" not in value and "/" not in value and not value.startswith("dlv_")
            assert "customer_" not in value


async def test_consumer_lag_counts_what_piled_up_and_returns_to_zero(harness, receiver):
    release = asyncio.Event()

    async def held(_req, _n):
        await release.wait()
        return web.Response(status=204)

    receiver.on("/held", held)
    settings = harness.settings(
        [{"space": "m-lag", "url": receiver.url("/held")}, {"space": "m-warm", "url": receiver.url("/ok")}],
        lag_interval_s=0.5,
        delivery_timeout_s=60,
    )
    first = await harness.start(settings)
    produce(harness.kafka, harness.events_topic, [orjson.dumps(make_event("m-warm"))])
    await wait_for(lambda: receiver.to("/ok"), what="a first delivery")
    await harness.stop(first)
    # While the consumer is stopped, 40 events pile up; on restart their deliveries hang, so
    # the committed offsets stay behind and the lag shows exactly what piled up.
    produce(harness.kafka, harness.events_topic, [orjson.dumps(make_event("m-lag")) for _ in range(40)])
    second = await harness.start(settings)
    ev = harness.events_topic

    async def lag(expected):
        return pick(await scrape(second), "perkamo_webhook_consumer_lag", topic=ev) == expected

    await wait_for(lambda: lag(40), timeout=20, what="lag 40 while deliveries hang")
    release.set()
    await wait_for(lambda: lag(0), timeout=20, what="lag back to 0")
