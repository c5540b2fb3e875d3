"""Issue 17 on the real path (broker, both roles, embedded ClickHouse, HTTPS receivers): attempt
spans in the event's trace (the SDK's in-memory exporter), opt-in propagation to the receiver,
network timings in the history table, and the endpoint certificate's expiry."""

from __future__ import annotations

import asyncio
import os
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
import trustme
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from consumer import tracing
from consumer.deliver_role import endpoint_changed
from consumer.endpoints import endpoint_id_for
from consumer.models import delivery_id_for
from tests.support import (
    ScriptedReceiver,
    event_records,
    make_event,
    produce,
    sequence,
    status,
    unique,
    wait_for,
)
from tests.test_delivery_contract import CONTRACT_HEADERS, HTTP_FRAMING
from tests.test_history_api import TOKEN, Api, cli, wait_delivery

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
COLUMNS = ("attempt", "status", "status_code", "trace_id", "span_id", "dns_ms", "connect_ms", "tls_ms",
           "ttfb_ms", "connection_reused", "cert_not_after", "delivery_id")


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on for the services this test starts, spans kept in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(tracing.Tracing(provider))
    yield exporter
    tracing.install(None)
    provider.shutdown()


def rows_of(harness: Any, event_id: str) -> list[dict[str, Any]]:
    return event_records(harness.store, event_id, COLUMNS)


async def delivered(harness: Any, event_id: str, timeout: float = 30) -> list[dict[str, Any]]:
    return await wait_for(
        lambda: (r := rows_of(harness, event_id)) and r[-1]["status"] == "delivered" and r,
        timeout=timeout, what="the delivered row")


def spans_of(exporter: InMemorySpanExporter, delivery_id: str) -> list[Any]:
    found = [s for s in exporter.get_finished_spans()
             if s.attributes.get("perkamo.delivery_id") == delivery_id]
    return sorted(found, key=lambda s: s.attributes["perkamo.attempt"])


async def test_attempts_are_spans_of_the_events_trace_across_a_503_then_a_204(harness, receiver, spans):
    space = unique("trace")
    receiver.on("/hook", sequence(503, 204))
    await harness.start(harness.settings([{"space": space, "url": receiver.url("/hook") + "?token=s3cr3t"}]))
    event = make_event(space)
    produce(harness.kafka, harness.events_topic, [orjson.dumps(event)],
            headers=[("traceparent", f"00-{TRACE}-{PARENT}-01".encode()), ("tracestate", b"vendor=1")])
    rows = await delivered(harness, event["id"])

    first, second = spans_of(spans, rows[0]["delivery_id"])
    assert [s.attributes["http.response.status_code"] for s in (first, second)] == [503, 204]
    assert {f"{s.context.trace_id:032x}" for s in (first, second)} == {TRACE}
    # attempt 1 is a child of the producer's span; the retry, of attempt 1 (the retry message carried it)
    assert f"{first.parent.span_id:016x}" == PARENT
    assert second.parent.span_id == first.context.span_id
    assert first.attributes["error.type"] == "503" and first.attributes["perkamo.outcome"] == "http_status"
    assert second.attributes["perkamo.outcome"] == "delivered" and "error.type" not in second.attributes
    assert second.attributes["perkamo.connection_reused"] is True  # the 503 left the connection open
    assert (second.attributes["perkamo.space"], second.attributes["perkamo.attempt"]) == (space, 2)
    assert second.attributes["server.address"] == "localhost"
    assert second.attributes["server.port"] == receiver.port
    for span in (first, second):
        assert "/hook" not in str(dict(span.attributes)) and "s3cr3t" not in str(dict(span.attributes))
    # the attempt records name the spans
    assert [(r["trace_id"], r["span_id"]) for r in rows] == [
        (TRACE, f"{s.context.span_id:016x}") for s in (first, second)]
    # propagation is off by default: the receiver saw the contract's headers only
    for request in receiver.to("/hook"):
        assert {k.decode().lower() for k, _ in request.raw_headers} == CONTRACT_HEADERS | HTTP_FRAMING


async def test_a_resend_stays_in_the_deliverys_trace(harness, receiver, spans, tmp_path):
    space = unique("trace-resend")
    broken = {"on": True}

    async def answer(request: Any, _: int) -> Any:
        return await status(500 if broken["on"] else 204)(request, 0)

    receiver.on("/hook", answer)
    settings = harness.settings([{"space": space, "url": receiver.url("/hook")}], retry_tiers=["1s"],
                                admin_token=TOKEN)
    await harness.start(settings)
    api = Api(settings)
    event = make_event(space)  # no traceparent: the first attempt starts a new trace
    produce(harness.kafka, harness.events_topic, [orjson.dumps(event)])
    delivery_id = delivery_id_for(event["id"], endpoint_id_for(space))
    await wait_delivery(api, delivery_id, 2, "failed")
    broken["on"] = False
    status_code, doc = await api.post(f"/deliveries/{delivery_id}/resend")
    assert status_code == 202, doc
    after = await wait_delivery(api, delivery_id, 3, "delivered")

    one, two, three = spans_of(spans, delivery_id)
    assert one.parent is None  # a new trace
    assert len({s.context.trace_id for s in (one, two, three)}) == 1
    assert two.parent.span_id == one.context.span_id
    assert three.parent.span_id == two.context.span_id  # from the history row, through Kafka
    assert three.attributes["perkamo.trigger"] == "resend"
    assert {a["trace_id"] for a in after["attempts"]} == {f"{one.context.trace_id:032x}"}

    # `history --delivery-id` names the trace
    code, out, err = await cli(tmp_path, settings, "history", "--delivery-id", delivery_id)
    assert code == 0, err
    assert f"trace {one.context.trace_id:032x}" in out


async def test_propagation_on_sends_the_attempt_spans_traceparent(harness, receiver, spans):
    space = unique("propagate")
    await harness.start(harness.settings([{"space": space, "url": receiver.url("/p")}],
                                         trace_propagation=True))
    event = make_event(space)
    produce(harness.kafka, harness.events_topic, [orjson.dumps(event)],
            headers=[("traceparent", f"00-{TRACE}-{PARENT}-01".encode())])
    (row,) = await delivered(harness, event["id"])
    (request,) = receiver.to("/p")
    names = [k.decode().lower() for k, _ in request.raw_headers]
    assert set(names) == CONTRACT_HEADERS | HTTP_FRAMING | {"traceparent"} and len(names) == len(set(names))
    assert request.headers["traceparent"] == f"00-{TRACE}-{row['span_id']}-01"
    assert row["span_id"] != PARENT


async def test_timing_columns_for_a_fresh_then_a_reused_connection(harness, receiver, tmp_path):
    space = unique("timing")
    settings = harness.settings([{"space": space, "url": receiver.url("/t")}], admin_token=TOKEN)
    app = await harness.start(settings)
    fresh_event, reused_event = make_event(space), make_event(space)
    produce(harness.kafka, harness.events_topic, [orjson.dumps(fresh_event)])
    (fresh,) = await delivered(harness, fresh_event["id"])
    produce(harness.kafka, harness.events_topic, [orjson.dumps(reused_event)])
    (reused,) = await delivered(harness, reused_event["id"])

    assert fresh["connection_reused"] is False
    for column in ("dns_ms", "connect_ms", "tls_ms", "ttfb_ms"):
        assert fresh[column] is not None and fresh[column] >= 0, column
    assert fresh["cert_not_after"] is not None  # a new TLS connection: its certificate was read
    assert reused["connection_reused"] is True
    assert (reused["dns_ms"], reused["connect_ms"], reused["tls_ms"]) == (0, 0, 0)
    assert reused["ttfb_ms"] is not None and reused["cert_not_after"] is None

    text = app.metrics.registry.get_sample_value
    assert text("perkamo_webhook_attempt_connections_total", {"reused": "true"}) >= 1
    assert text("perkamo_webhook_attempt_connections_total", {"reused": "false"}) >= 1
    assert text("perkamo_webhook_attempt_phase_seconds_count", {"phase": "tls"}) >= 1
    assert text("perkamo_webhook_attempt_phase_seconds_count", {"phase": "ttfb"}) >= 2

    code, out, err = await cli(tmp_path, settings, "history", "--delivery-id", reused["delivery_id"])
    assert code == 0, err
    header = next(line for line in out.splitlines() if "ttfb" in line)
    for name in ("dns", "connect", "tls", "ttfb", "conn"):
        assert name in header
    assert "reused" in out


async def test_timings_off_leaves_the_columns_unmeasured(harness, receiver):
    space = unique("timing-off")
    await harness.start(harness.settings([{"space": space, "url": receiver.url("/t")}],
                                         network_timings=False))
    event = make_event(space)
    produce(harness.kafka, harness.events_topic, [orjson.dumps(event)])
    (row,) = await delivered(harness, event["id"])
    assert [row[c] for c in ("dns_ms", "connect_ms", "tls_ms", "ttfb_ms", "connection_reused")] == [None] * 5
    assert len(row["trace_id"]) == 32  # ids without the SDK


# Certificate expiry ------------------------------------------------------------------------

THREE_DAYS = 3 * 86400


@pytest.fixture
async def expiring_receiver(ca: trustme.CA) -> AsyncIterator[ScriptedReceiver]:
    """An HTTPS receiver whose certificate (from the session's test CA) expires in 3 days."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    not_after = datetime.now(UTC) + timedelta(days=3)
    ca.issue_cert("localhost", "127.0.0.1", not_after=not_after).configure_cert(context)
    rec = ScriptedReceiver(context)
    await rec.start()
    yield rec
    await rec.stop()


def _near_three_days(value: Any) -> bool:
    return value is not None and THREE_DAYS - 600 < float(value) <= THREE_DAYS


async def test_a_certificate_expiring_in_three_days_is_seen_kept_and_dropped(
        harness, expiring_receiver, tmp_path):
    space = unique("cert")
    records = [{"space": space, "url": expiring_receiver.url("/c")}]
    settings = harness.settings(records, admin_token=TOKEN)
    app = await harness.start(settings)
    event = make_event(space)
    produce(harness.kafka, harness.events_topic, [orjson.dumps(event)])
    (row,) = await delivered(harness, event["id"])
    assert _near_three_days(row["cert_not_after"].timestamp() - datetime.now(UTC).timestamp() + 1)

    # the deliver role: the gauge (refreshed every second) and its endpoint health
    gauge = "perkamo_webhook_endpoint_cert_expiry_seconds"
    value = await wait_for(lambda: app.metrics.registry.get_sample_value(gauge, {"space": space}),
                           timeout=5, what="the expiry gauge")
    assert _near_three_days(value)
    status_code, doc = await Api(settings, deliver=True).get("/endpoints/health")
    assert status_code == 200 and _near_three_days(doc["endpoints"][space]["cert_expires_in_s"])
    # the history role, from the attempt records: its API (the CLI's and the console's source)
    status_code, doc = await Api(settings).get("/endpoints/health")
    assert status_code == 200 and _near_three_days(doc["endpoints"][space]["cert_expires_in_s"])
    assert _near_three_days(app.history.endpoint_health(space)["cert_expires_in_s"])

    # `endpoints list` shows it (records from the file, expiry from the history role)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERKAMO_")}
    env.update({"PERKAMO_ADMIN_LISTEN": settings.admin_listen, "PERKAMO_ADMIN_TOKEN": TOKEN,
                "PERKAMO_KAFKA_BOOTSTRAP_SERVERS": harness.kafka,
                "PERKAMO_ENDPOINTS_FILE": str(settings.endpoints_file), "COLUMNS": "250"})
    listed = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "consumer", "endpoints", "list", "--json"], env=env,
        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    (mine,) = [r for r in orjson.loads(listed.stdout) if r["space"] == space]
    assert _near_three_days(mine["cert_expires_in_s"]) and mine["cert_not_after"]
    # and its health, from the same attempt records: the delivery succeeded
    assert mine["health"]["state"] == "healthy" and mine["health"]["circuit"] == "closed"
    assert mine["health"]["last_success_at"]
    table = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "consumer", "endpoints", "list"], env=env,
        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    line = next(r for r in table.stdout.splitlines() if space in r)
    assert "(in 3 days)  RENEW" in line or "(in 2 days)  RENEW" in line
    assert "healthy: 0% failed of " in line

    # the endpoint goes away: its gate (and certificate) and its series are dropped in the deliver
    # role (the registry listener's work), and the history role forgets it too
    endpoint = app.registry.get(space)
    endpoint_changed(app.deliver, space, endpoint, None)
    app.history.health.endpoint_changed(space, endpoint, None)
    assert all(gate.space != space for gate in app.service.gates)
    assert app.metrics.registry.get_sample_value(gauge, {"space": space}) is None
    app.service.ctx.reporter.refresh(app.service.gates)
    assert app.metrics.registry.get_sample_value(gauge, {"space": space}) is None
    assert space not in app.history.endpoints_health()
