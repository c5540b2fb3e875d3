"""Trace context in headers and records, the OTEL_* set-up, attempt spans (in-memory exporter),
network-timing arithmetic and the certificate kept per endpoint: no broker, no network."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from consumer import attempts, nettiming
from consumer import constants as c
from consumer.breaker import CircuitState
from consumer.errors import ConfigError
from consumer.headers import DeliveryMeta, held_headers, read_meta, republish_headers, retry_headers
from consumer.health import EndpointHealth, HealthBook, HealthPolicy
from consumer.models import AttemptResult, AttemptRow, Endpoint, Event
from consumer.nettiming import NetTiming, Phases
from consumer.tracecontext import TraceContext, of_ids, parse
from consumer.tracing import Tracing, exporter_names, from_env

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE}-{PARENT}-01".encode()
SECRET_PATH = "/hooks/s3cr3t-path"


# W3C values ------------------------------------------------------------------------------


def test_a_well_formed_traceparent_and_its_tracestate_are_read():
    ctx = parse(TRACEPARENT, b"vendor=abc,other=1")
    assert ctx == TraceContext(TRACE, PARENT, 1, "vendor=abc,other=1")
    assert ctx.traceparent == TRACEPARENT.decode() and ctx.sampled
    assert ctx.headers() == [("traceparent", TRACEPARENT), ("tracestate", b"vendor=abc,other=1")]


@pytest.mark.parametrize("value", [
    b"", b"garbage", b"00-" + b"0" * 32 + b"-00f067aa0ba902b7-01",
    b"00-" + TRACE.encode() + b"-" + b"0" * 16 + b"-01",
    b"00-" + TRACE.upper().encode() + b"-00f067aa0ba902b7-01",
    b"ff-" + TRACE.encode() + b"-00f067aa0ba902b7-01",
    b"00-" + TRACE.encode() + b"-00f067aa0ba902b7-01-extra",
])
def test_a_malformed_traceparent_is_ignored(value):
    assert parse(value) is None


def test_a_later_version_is_read_by_its_first_four_fields():
    assert parse(b"01-" + TRACE.encode() + b"-00f067aa0ba902b7-01-more") == TraceContext(TRACE, PARENT, 1)


def test_a_bad_tracestate_is_dropped_not_the_trace():
    assert parse(TRACEPARENT, b"\x00bad").state == ""  # type: ignore[union-attr]


def test_ids_from_a_record():
    assert of_ids(TRACE, PARENT) == TraceContext(TRACE, PARENT, 1)
    assert of_ids("", "") is None and of_ids(TRACE, "") is None and of_ids("x" * 32, PARENT) is None


# Kafka headers: read in read_meta, written by every writer --------------------------------


def test_read_meta_takes_the_trace_and_never_dead_letters_for_a_bad_one():
    assert read_meta({"traceparent": TRACEPARENT}).trace == TraceContext(TRACE, PARENT, 1)
    assert read_meta({"traceparent": b"not-a-traceparent"}).trace is None  # no InvalidEvent
    assert read_meta({}).trace is None


def test_retry_and_held_messages_carry_the_trace_and_read_back_the_same():
    meta = DeliveryMeta(trace=TraceContext(TRACE, PARENT, 1, "v=1"))
    retry = retry_headers(meta, "dlv_1", ("perkamo.events", 0, 5), failed_at_ms=1, error_kind="http_status",
                          status_code=503, due=2)
    held = held_headers(meta, "dlv_1", ("perkamo.events", 0, 5), trigger="initial", reason="circuit_open",
                        held_since_ms=1)
    for headers in (retry, held):
        names = [name for name, _ in headers]
        assert names.count("traceparent") == 1 and names.count("tracestate") == 1
        assert read_meta(dict(headers)).trace == meta.trace
    assert "traceparent" not in dict(retry_headers(DeliveryMeta(), "dlv_1", ("t", 0, 0), failed_at_ms=1,
                                                   error_kind="timeout", status_code=0, due=2))


def test_a_resend_continues_the_trace_it_is_given():
    headers = dict(republish_headers("dlv_1", ("perkamo.events", 0, 5), attempt=3, trigger=c.TRIGGER_RESEND,
                                     replay_id="rsn_x", trace=TraceContext(TRACE, PARENT, 1)))
    assert headers["traceparent"] == TRACEPARENT


# Attempt records -------------------------------------------------------------------------


def _row(**fields: object) -> AttemptRow:
    now = datetime(2026, 6, 1, tzinfo=UTC)
    row = AttemptRow("dlv_1", 1, "evt_1", "purchase.completed", "shop", "live", "ep_1", "hooks.example.com",
                     "u", "t", "initial", "delivered", 204, "No Content", 12, "", now, None, "{}", "",
                     "topic",
                     0, 1)
    for name, value in fields.items():
        setattr(row, name, value)
    return row


def test_records_round_trip_the_new_fields_and_older_records_still_read():
    row = _row(trace_id=TRACE, span_id=PARENT, dns_ms=1, connect_ms=2, tls_ms=3, ttfb_ms=4,
               connection_reused=False, cert_not_after=datetime(2026, 9, 1, tzinfo=UTC))
    assert attempts.decode(attempts.encode(row)) == row
    old = orjson.loads(attempts.encode(_row()))
    for name in attempts.OPTIONAL:
        old.pop(name, None)
    back = attempts.decode(orjson.dumps(old))
    assert (back.trace_id, back.dns_ms, back.connection_reused, back.cert_not_after) == ("", None, None, None)


# OTEL_* set-up ---------------------------------------------------------------------------


def test_no_exporter_configured_means_no_sdk():
    assert exporter_names({}) == []
    tracing = from_env({})
    assert not tracing.enabled and tracing.provider is None
    assert exporter_names({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}) == ["otlp"]
    assert exporter_names({"OTEL_TRACES_EXPORTER": "console,none"}) == ["console"]
    assert exporter_names({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}) == []


def test_settings_it_cannot_follow_are_config_errors():
    with pytest.raises(ConfigError, match="OTEL_TRACES_EXPORTER"):
        exporter_names({"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(ConfigError, match="http/protobuf"):
        from_env({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})


def test_otlp_from_the_environment_names_the_service(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    tracing = from_env()
    try:
        assert tracing.enabled
        assert tracing.provider.resource.attributes["service.name"] == "perkamo-webhooks"
    finally:
        tracing.shutdown()
    monkeypatch.setenv("OTEL_SERVICE_NAME", "webhooks-eu")
    tracing = from_env()
    try:
        assert tracing.provider.resource.attributes["service.name"] == "webhooks-eu"
    finally:
        tracing.shutdown()


# Spans -----------------------------------------------------------------------------------


@pytest.fixture
def exported() -> tuple[Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider), exporter


ENDPOINT = Endpoint("ep_1", "shop", f"https://hooks.example.com:8443{SECRET_PATH}?token=abc")
EVENT = Event(b"{}", "evt_1", "purchase.completed", "shop", "live", "u", "t")


def _attempt(tracing: Tracing, parent: TraceContext | None, result: AttemptResult,
             phases: Phases) -> TraceContext:
    span = tracing.attempt(parent, endpoint=ENDPOINT, event=EVENT, delivery_id="dlv_1", attempt=2,
                           trigger="retry")
    span.end(result, phases)
    return span.context


def test_an_attempt_span_has_the_http_client_conventions_and_never_the_url(exported):
    tracing, exporter = exported
    parent = TraceContext(TRACE, PARENT, 1, "v=1")
    ctx = _attempt(tracing, parent, AttemptResult("http_status", 503, "Unavailable", 30, "HTTP 503"),
                   Phases(3, 1, 5, 20, False))
    (span,) = exporter.get_finished_spans()
    assert span.name == "POST" and span.kind.name == "CLIENT"
    assert f"{span.context.trace_id:032x}" == TRACE == ctx.trace_id
    assert f"{span.parent.span_id:016x}" == PARENT and span.parent.is_remote
    assert ctx.span_id == f"{span.context.span_id:016x}" and ctx.state == "v=1"
    assert dict(span.attributes) == {
        "http.request.method": "POST", "url.scheme": "https", "server.address": "hooks.example.com",
        "server.port": 8443, "http.response.status_code": 503, "error.type": "503",
        "perkamo.delivery_id": "dlv_1", "perkamo.attempt": 2, "perkamo.space": "shop",
        "perkamo.event_type": "purchase.completed", "perkamo.trigger": "retry",
        "perkamo.outcome": "http_status",
        "perkamo.connection_reused": False, "perkamo.dns_ms": 3, "perkamo.connect_ms": 1, "perkamo.tls_ms": 5,
        "perkamo.ttfb_ms": 20,
    }
    assert span.status.status_code.name == "ERROR"
    text = str(dict(span.attributes)) + span.name + str(span.status.description)
    assert "s3cr3t" not in text and "token" not in text and "url.full" not in span.attributes


def test_without_a_parent_a_new_trace_starts_and_a_success_is_not_an_error(exported):
    tracing, exporter = exported
    ctx = _attempt(tracing, None, AttemptResult("delivered", 204, "No Content", 5), Phases(0, 0, 0, 4, True))
    (span,) = exporter.get_finished_spans()
    assert span.attributes["perkamo.connection_reused"] is True and span.attributes["perkamo.ttfb_ms"] == 4
    assert "perkamo.tls_ms" not in span.attributes  # a kept-alive connection skipped it
    assert span.parent is None and f"{span.context.trace_id:032x}" == ctx.trace_id
    assert span.status.status_code.name == "UNSET" and "error.type" not in span.attributes
    timeout = _attempt(tracing, ctx, AttemptResult("timeout", 0, "", 2000, "timed out"),
                       Phases(0, 0, 0, None, True))
    assert timeout.trace_id == ctx.trace_id
    assert exporter.get_finished_spans()[1].attributes["error.type"] == "timeout"


def test_tracing_off_still_gives_ids_that_keep_one_trace():
    tracing = Tracing()
    first = _attempt(tracing, None, AttemptResult("http_status", 503), Phases(None, None, None, None, None))
    second = _attempt(tracing, first, AttemptResult("delivered", 204), Phases(None, None, None, None, None))
    assert len(first.trace_id) == 32 and first.flags == 0
    assert second.trace_id == first.trace_id and second.span_id != first.span_id
    upstream = TraceContext(TRACE, PARENT, 1)
    third = _attempt(tracing, upstream, AttemptResult("delivered", 204), Phases(0, 0, 0, 1, True))
    assert third.trace_id == TRACE


# Timing arithmetic -----------------------------------------------------------------------


def test_phases_of_a_new_connection_a_kept_alive_one_and_failures():
    fresh = NetTiming(started=0.999, dns_start=1.001, dns_end=1.004, dial_start=1.004, tls_start=1.006,
                      tls_end=1.016, answered=1.056)
    assert fresh.phases() == Phases(3, 2, 10, 40, False)
    cached = NetTiming(started=0.999, dial_start=1.0, tls_start=1.002, tls_end=1.005, answered=1.006)
    assert cached.phases() == Phases(0, 2, 3, 1, False)  # a cached name: DNS skipped
    reused = NetTiming(started=2.0, answered=2.003)  # nothing looked up or dialled
    assert reused.phases() == Phases(0, 0, 0, 3, True)
    timed_out = NetTiming(started=2.0)  # on a kept-alive connection, no answer
    assert timed_out.phases() == Phases(0, 0, 0, None, True)
    tls_failed = NetTiming(started=1.0, dns_start=1.0, dns_end=1.001, dial_start=1.001, tls_start=1.002)
    assert tls_failed.phases() == Phases(1, 1, None, None, False)
    dns_failed = NetTiming(started=1.0, dns_start=1.0)
    assert dns_failed.phases() == Phases(None, None, None, None, False)
    blocked_at_dial = NetTiming(started=1.0, dial_start=1.0)  # the socket factory refused it
    assert blocked_at_dial.phases() == Phases(0, None, None, None, False)
    assert NetTiming(started=1.0, refused=True).phases() == Phases(None, None, None, None, None)


def test_the_marks_are_no_ops_outside_a_timed_attempt():
    """The resolver, socket factory and delivery mark unconditionally; without begin() (timings
    off, the CLI, other tasks) nothing is recorded and nothing fails."""
    import contextvars

    def outside() -> None:
        nettiming.dns_started()
        nettiming.dial_started()
        nettiming.refused()
        nettiming.answered()

    contextvars.Context().run(outside)

    def inside() -> NetTiming:
        timing = nettiming.begin()
        nettiming.dial_started()
        first = timing.dial_start
        nettiming.dial_started()  # a second address tried (happy eyeballs): the first dial counts
        assert timing.dial_start == first
        nettiming.answered()
        return timing

    timing = contextvars.Context().run(inside)
    assert timing.dial_start and timing.answered and not timing.dns_start


# Certificates kept per endpoint ----------------------------------------------------------


def test_the_history_roles_view_keeps_the_latest_certificate_and_drops_it_with_the_endpoint():
    book = HealthBook(HealthPolicy())
    at = datetime(2026, 6, 1, tzinfo=UTC)
    newer = datetime(2026, 9, 1, tzinfo=UTC)
    book.observe([_row(attempted_at=at.replace(hour=2), cert_not_after=newer),
                  _row(attempted_at=at.replace(hour=1), cert_not_after=datetime(2026, 7, 1, tzinfo=UTC))])
    assert book.snapshot()["shop"]["cert_not_after"] == "2026-09-01T00:00:00.000Z"
    endpoint = Endpoint("ep_1", "shop", "https://hooks.example.com/a")
    book.endpoint_changed("shop", endpoint, Endpoint("ep_1", "shop", "https://other.example.com/a"))
    assert book.snapshot()["shop"]["cert_not_after"] is None  # a new URL: its own certificate
    book.observe([_row(cert_not_after=newer)])
    book.endpoint_changed("shop", endpoint, None)
    assert "shop" not in book.snapshot()


def test_the_deliver_roles_endpoint_health_shows_seconds_until_expiry():
    health = EndpointHealth(HealthPolicy())
    health.saw_certificate(2_000_000_000.0)
    snapshot = health.snapshot(0.0, CircuitState.CLOSED, 0)
    assert snapshot["cert_not_after"] == "2033-05-18T03:33:20.000Z"
    assert snapshot["cert_expires_in_s"] > 0
