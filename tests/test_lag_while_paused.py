"""The history group's lag keeps moving while the history role is paused because its store
fails (issue 20, item 10): librdkafka stops fetching a paused partition, so its statistics
freeze; the broker watch reads the high watermark instead. Real broker, loopback."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest

from consumer import attempts
from consumer import constants as c
from consumer.config import Settings, load_settings
from consumer.ingest import HistoryIngest
from consumer.kafka_admin import BrokerWatch
from consumer.metrics import Metrics
from consumer.models import AttemptRow
from tests.support import fast_forward_group, produce, unique, wait_for

pytestmark = pytest.mark.integration


def row(n: int, space: str) -> AttemptRow:
    return AttemptRow(
        delivery_id=f"dlv_lag_{space}_{n}", attempt=1, event_id=f"evt_{n}", event_type="purchase.completed",
        space_slug=space, environment="live", endpoint_id="ep_x", endpoint_host="example.com",
        user_id="u", transaction_id="", trigger="initial", status="delivered", status_code=204,
        status_text="No Content", duration_ms=3, error="", attempted_at=datetime.now(UTC),
        next_attempt_at=None, request_body='{"id":"evt"}', response_excerpt="", source_topic="t",
        source_partition=0, source_offset=n,
    )


def lag(metrics: Metrics) -> float:
    return sum(s.value for m in metrics.registry.collect() if m.name == "perkamo_webhook_consumer_lag"
               for s in m.samples)


def history_settings(kafka: str, name: str) -> Settings:
    """A history writer's settings in a fresh group, past older records, with quick statistics."""
    group = unique(name)
    fast_forward_group(kafka, group, [c.ATTEMPTS_TOPIC])
    return load_settings(kafka_bootstrap_servers=kafka, history_group_id=group, lag_interval_s=0.3,
                         history_flush_interval_s=0.1, drain_timeout_s=1.0)


async def test_the_history_lag_grows_while_its_store_fails(kafka: str, topics: Any) -> None:
    """Without the watch the gauge stayed at `before` (measured: the statistics' hi_offset of
    a paused partition does not move)."""
    settings = history_settings(kafka, "lag-paused")
    space = unique("lag")

    def down(rows: list[AttemptRow]) -> None:
        raise ConnectionError("history store down (test)")

    metrics = Metrics()
    ingest = HistoryIngest(settings, down, metrics)
    watch = BrokerWatch(settings, interval_s=0.3)
    ingest.start()
    watch.start()
    try:
        produce(kafka, c.ATTEMPTS_TOPIC, [attempts.encode(row(n, space)) for n in range(3)])
        await wait_for(lambda: metrics.registry.get_sample_value(
            "perkamo_webhook_history_write_errors_total") or 0, timeout=30, what="a failed insert (paused)")
        await wait_for(lambda: lag(metrics) >= 3, timeout=15, what="the first records' lag")
        await asyncio.sleep(1.0)  # paused now: nothing more is fetched
        before = lag(metrics)
        produce(kafka, c.ATTEMPTS_TOPIC, [attempts.encode(row(n, space)) for n in range(3, 43)])
        await wait_for(lambda: lag(metrics) >= before + 40, timeout=10, what="the lag to grow by 40")
        assert ingest.healthy is False  # still paused: the store never came back
    finally:
        watch.stop()
        await asyncio.to_thread(ingest.stop, 5.0)
    # Stopped: no statistics come any more, so no series is left to freeze.
    assert not [s for m in metrics.registry.collect() if m.name == "perkamo_webhook_consumer_lag"
                for s in m.samples]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_a_history_writer_that_died_leaves_no_lag_series(kafka: str, topics: Any) -> None:
    settings = history_settings(kafka, "lag-dead")
    space = unique("lag-dead")

    def broken_listener(rows: list[AttemptRow]) -> None:
        raise RuntimeError("a bug after the insert (test)")

    metrics = Metrics()
    ingest = HistoryIngest(settings, lambda rows: None, metrics, on_rows=broken_listener)
    ingest.start()
    try:
        await wait_for(lambda: lag(metrics) >= 0 and [
            s for m in metrics.registry.collect() if m.name == "perkamo_webhook_consumer_lag"
            for s in m.samples], timeout=30, what="lag series")
        produce(kafka, c.ATTEMPTS_TOPIC, [attempts.encode(row(n, space)) for n in range(3)])
        thread = ingest._thread
        assert thread is not None
        await wait_for(lambda: not thread.is_alive(), timeout=30, what="the writer's thread to end")
        assert ingest.running is False  # the history role's /readyz says `history: false`
        await wait_for(lambda: not [s for m in metrics.registry.collect()
                                    if m.name == "perkamo_webhook_consumer_lag" for s in m.samples],
                       timeout=15, what="its lag series to go (no statistics come any more)")
    finally:
        await asyncio.to_thread(ingest.stop, 5.0)
