"""OpenTelemetry traces: each delivery attempt is a CLIENT span (HTTP client semantic conventions).

Set up from the standard environment settings, read once per process:

- `OTEL_TRACES_EXPORTER`: `otlp` (OTLP over HTTP/protobuf), `console` (JSON lines on stdout) or
  `none`; a comma-separated list for several. Unset: `otlp` when `OTEL_EXPORTER_OTLP_ENDPOINT`
  or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set, else `none`. `OTEL_SDK_DISABLED=true` wins.
- the exporter's own `OTEL_EXPORTER_OTLP_*` (endpoint, headers, certificate, timeout,
  compression), `OTEL_SERVICE_NAME` (default `perkamo-webhooks`), `OTEL_RESOURCE_ATTRIBUTES`,
  `OTEL_TRACES_SAMPLER[_ARG]` (default parent-based always-on) and `OTEL_BSP_*` (the batch
  processor that exports off the event loop).

With no exporter the SDK is not started at all: an attempt then costs a fresh span id and no
span (`Tracing.enabled` is False), and its ids still go into the attempt record and headers, so
the delivery's attempts share one trace id either way.

Attributes never carry the URL or its path (the URL is a secret): the host and port only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, Final, Protocol

import yarl
from opentelemetry import trace as otel
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

from consumer.errors import ConfigError
from consumer.models import AttemptResult, Endpoint, Event
from consumer.nettiming import Phases
from consumer.tracecontext import TraceContext, child_of

log = logging.getLogger(__name__)

SERVICE_NAME: Final = "perkamo-webhooks"
SCOPE: Final = "consumer.delivery"
SPAN_NAME: Final = "POST"  # HTTP client spans are named by method when there is no URL template
_EXPORTERS: Final = ("otlp", "console", "none")
_TIMINGS: Final = ("dns_ms", "connect_ms", "tls_ms", "ttfb_ms")


class AttemptSpan(Protocol):
    """One attempt's span while it runs; `context` is what the request and records carry."""

    @property
    def context(self) -> TraceContext: ...

    def end(self, result: AttemptResult, phases: Phases) -> None: ...


class _Unrecorded:
    """Tracing off: ids only (a child of the delivery's context, or a new trace), no span."""

    __slots__ = ("context",)

    def __init__(self, parent: TraceContext | None) -> None:
        self.context = child_of(parent)

    def end(self, result: AttemptResult, phases: Phases) -> None:
        pass


@lru_cache(maxsize=65_536)
def _port(url: str) -> int:
    try:
        return yarl.URL(url).port or 443
    except (ValueError, TypeError):
        return 443


class Tracing:
    """Makes the attempt spans; `Tracing()` is off (no SDK, no spans)."""

    def __init__(self, provider: Any = None) -> None:
        self.provider = provider  # an opentelemetry.sdk.trace.TracerProvider, or None
        self._tracer = provider.get_tracer(SCOPE) if provider is not None else None

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    def attempt(
        self, parent: TraceContext | None, *, endpoint: Endpoint, event: Event, delivery_id: str,
        attempt: int, trigger: str,
    ) -> AttemptSpan:
        """Start the span of one attempt, a child of the delivery's context (new trace if None)."""
        if self._tracer is None:
            return _Unrecorded(parent)
        return _Recorded(self._tracer, parent, {
            "http.request.method": "POST",
            "url.scheme": "https",
            "server.address": endpoint.host,
            "server.port": _port(endpoint.url),
            "perkamo.delivery_id": delivery_id,
            "perkamo.attempt": attempt,
            "perkamo.space": event.space_slug,
            "perkamo.event_type": event.type,
            "perkamo.trigger": trigger,
        })

    def flush(self, timeout_s: float = 5.0) -> None:
        """Export what is buffered (at shutdown: the batch processor would drop it)."""
        if self.provider is not None:
            self.provider.force_flush(int(timeout_s * 1000))

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()


class _Recorded:
    __slots__ = ("_span", "context")

    def __init__(self, tracer: Any, parent: TraceContext | None, attributes: dict[str, Any]) -> None:
        self._span = tracer.start_span(SPAN_NAME, context=_parent(parent), kind=SpanKind.CLIENT,
                                       attributes=attributes)
        sc = self._span.get_span_context()
        self.context = TraceContext(f"{sc.trace_id:032x}", f"{sc.span_id:016x}", int(sc.trace_flags),
                                    parent.state if parent is not None else "")

    def end(self, result: AttemptResult, phases: Phases) -> None:
        span = self._span
        if span.is_recording():
            span.set_attribute("perkamo.outcome", result.outcome)
            if result.status_code:
                span.set_attribute("http.response.status_code", result.status_code)
            if not result.delivered:
                # semantic conventions: the status code for an HTTP answer, else the error class
                error = str(result.status_code) if result.status_code else result.outcome
                span.set_attribute("error.type", error)
                span.set_status(Status(StatusCode.ERROR))
            if phases.reused is not None:
                # Each attribute costs the SDK a few µs: a kept-alive connection's steps are 0.
                timings: dict[str, Any] = {"perkamo.connection_reused": phases.reused}
                for name in ("ttfb_ms",) if phases.reused else _TIMINGS:
                    value = getattr(phases, name)
                    if value is not None:
                        timings[f"perkamo.{name}"] = value
                span.set_attributes(timings)
        span.end()


def _parent(parent: TraceContext | None) -> Any:
    """The SDK's context for a remote parent (None: a root span, a new trace)."""
    if parent is None:
        return None
    state = TraceState.from_header([parent.state]) if parent.state else None
    span_context = SpanContext(int(parent.trace_id, 16), int(parent.span_id, 16), is_remote=True,
                               trace_flags=TraceFlags(parent.flags), trace_state=state)
    return otel.set_span_in_context(NonRecordingSpan(span_context))


# Set-up from OTEL_* ------------------------------------------------------------------------


def exporter_names(environ: Mapping[str, str]) -> list[str]:
    """The exporters the environment asks for ([] = tracing off)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    given = environ.get("OTEL_TRACES_EXPORTER")
    if given is None:
        endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT")
        given = "otlp" if endpoint else "none"
    names = [name.strip().lower() for name in given.split(",") if name.strip()]
    for name in names:
        if name not in _EXPORTERS:
            raise ConfigError(f"OTEL_TRACES_EXPORTER: {name!r} is not one of {', '.join(_EXPORTERS)}")
    return [name for name in names if name != "none"]


def _resource(environ: Mapping[str, str]) -> Any:
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415 - the SDK only when tracing is on

    named = environ.get("OTEL_SERVICE_NAME") or "service.name=" in environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    return Resource.create({} if named else {"service.name": SERVICE_NAME})


def from_env(environ: Mapping[str, str] | None = None) -> Tracing:
    """Tracing as the OTEL_* settings ask; ConfigError names a setting it cannot follow."""
    env = os.environ if environ is None else environ
    names = exporter_names(env)
    if not names:
        return Tracing()
    # The SDK (and the exporter: protobuf, requests) is imported only when tracing is on.
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter  # noqa: PLC0415

    provider = TracerProvider(resource=_resource(env))
    for name in names:
        if name == "otlp":
            protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf")
            if protocol != "http/protobuf":
                raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} is not supported; this "
                                  "service exports OTLP over http/protobuf (port 4318 of a collector)")
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
                OTLPSpanExporter,
            )

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        else:
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    log.info("tracing on: exporting spans with %s", ",".join(names))
    return Tracing(provider)


_installed: Tracing | None = None


def current() -> Tracing:
    """This process's tracing, set up from the environment on first use."""
    global _installed  # noqa: PLW0603 - one provider per process, like the SDK's own global
    if _installed is None:
        _installed = from_env()
    return _installed


def install(tracing: Tracing | None) -> None:
    """Use `tracing` from now on (tests, benchmarks); None: set up from the environment again."""
    global _installed  # noqa: PLW0603
    _installed = tracing
