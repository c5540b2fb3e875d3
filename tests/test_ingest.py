"""The history role's writer on the real broker: commits after the insert, stops in bounded time."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

from consumer import attempts
from consumer import constants as c
from consumer.ingest import HistoryIngest
from consumer.metrics import Metrics
from consumer.models import AttemptRow
from tests.support import fast_forward_group, produce, unique, wait_for


def _row(n: int, space: str) -> AttemptRow:
    return AttemptRow(
        delivery_id=f"dlv_ingest_{space}_{n}", attempt=1, event_id=f"evt_{n}",
        event_type="purchase.completed",
        space_slug=space, environment="live", endpoint_id="ep_x", endpoint_host="example.com",
        user_id="u", transaction_id="", trigger="initial", status="delivered", status_code=204,
        status_text="No Content", duration_ms=3, error="", attempted_at=datetime.now(UTC),
        next_attempt_at=None, request_body='{"id":"evt"}', response_excerpt="", source_topic="t",
        source_partition=0, source_offset=n,
    )


async def test_a_stop_while_the_store_is_down_is_bounded_and_leaves_the_group(harness: Any) -> None:
    group = unique("ingest")
    fast_forward_group(harness.kafka, group, [c.ATTEMPTS_TOPIC])
    settings = harness.settings(history_group_id=group, drain_timeout_s=2.0, history_flush_interval_s=0.2)
    space = unique("ingest")
    produce(harness.kafka, c.ATTEMPTS_TOPIC, [attempts.encode(_row(n, space)) for n in range(20)])

    def down(rows: list[AttemptRow]) -> None:
        raise ConnectionError("history store down (test)")

    metrics = Metrics()
    failing = HistoryIngest(settings, down, metrics)
    failing.start()
    await wait_for(lambda: metrics.registry.get_sample_value(
        "perkamo_webhook_history_write_errors_total") or 0, timeout=30, what="a failed insert")
    started = time.monotonic()
    assert await asyncio.to_thread(failing.stop, 10.0) is False  # rows left, on the topic
    assert time.monotonic() - started < 8  # the drain budget (2 s) plus leaving the group

    written: list[AttemptRow] = []
    working = HistoryIngest(settings, written.extend, Metrics())
    started = time.monotonic()
    working.start()
    try:
        # The stopped member left the group: its partitions move at once, not after the
        # session timeout, and nothing it had gathered is lost (it was never committed).
        await wait_for(lambda: len({r.delivery_id for r in written if r.space_slug == space}) == 20,
                       timeout=40, what="every record, re-read by the next member")
        assert time.monotonic() - started < 30
    finally:
        await asyncio.to_thread(working.stop, 10.0)
