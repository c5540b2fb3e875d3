"""Launcher for the benchmark's tracing-on run (phase 2): `python -m tests.bench_tracing run ...`
is `perkamo-webhooks run ...` with the OpenTelemetry SDK on, spans going through the batch span
processor as in production into an in-memory exporter that only counts them. The figure is
then the cost of making, ending and batching a span per attempt (the SDK's share), without a
collector's network and protobuf costs, which depend on where the collector is."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from consumer import tracing


class CountingExporter(SpanExporter):
    """Keeps nothing but the number of spans it was given; says it at shutdown (stderr)."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        sys.stderr.write(f"bench_tracing: {self.spans} spans exported\n")


def main(argv: list[str]) -> int:
    provider = TracerProvider(resource=Resource.create({"service.name": "perkamo-webhooks-bench"}))
    provider.add_span_processor(BatchSpanProcessor(CountingExporter()))
    tracing.install(tracing.Tracing(provider))
    from consumer.cli import main as cli_main

    try:
        return cli_main(argv)
    finally:
        provider.shutdown()


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
