"""History benchmark on the embedded engine: insert throughput and the support query's latency.

    python -m tests.bench_history [--rows 1000000] [--writer-rows 200000]

Seeds `--rows` attempts (50 Spaces over 30 days, ~1.2 attempts per delivery, ~5 % failed,
event bodies of ~650 bytes) with HistoryStore.insert in batches of PERKAMO_HISTORY_BATCH_ROWS's
default, then pushes `--writer-rows` more through HistoryWriter (one future per row, as the
Kafka loop does), then times "one Space, last 24 h, failed" (the API's delivery list), a
lookup by delivery id and a replay selection. Uses a chDB path of its own (a temp directory),
so it never touches a consumer's data. Not collected by pytest (bench_*.py).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from consumer import constants as c
from consumer.config import Settings
from consumer.history import TABLE, HistoryStore, HistoryWriter
from consumer.metrics import Metrics
from consumer.models import AttemptRow, delivery_id_for
from consumer.queries import DeliveryFilter, delivery_attempts, list_deliveries
from consumer.sql import REPLAY_SELECTION

SPACES = [f"space-{n:02d}" for n in range(50)]
TARGET = SPACES[7]
EVENT_TYPES = ("purchase.completed", "reward.granted", "wallet.updated")
ERROR_KINDS = ("http_status", "timeout", "connect_error", "tls_error")


def body(event_id: str, space: str, kind: str, n: int) -> bytes:
    return orjson.dumps({
        "id": event_id, "type": kind, "created_at": "2026-06-01T10:00:00.000Z",
        "data": {
            "space": {"slug": space, "name": "Commerce Live", "environment": "live"},
            "user_id": f"customer_{n % 50_000}", "transaction_id": f"order_{n}", "event": kind,
            "status": "applied", "occurred_at": "2026-06-01T10:00:00.000Z",
            "context": {"amount": 12900 + n % 1000, "currency": "CZK", "channel": "web",
                        "store": f"store-{n % 40}"},
            "delta": [{"wallet": "loyalty_points", "amount": 10 + n % 90}],
            "effects": [{"kind": "reward", "reward_id": f"rw_{n % 300}", "status": "granted"}],
            "wallet_state": {"loyalty_points": 120 + n % 5000, "tier": "gold"},
        },
    })


def attempts(count: int, days: int, seed: int, prefix: str = "evt") -> Iterator[AttemptRow]:
    """Attempt rows of deliveries spread over the last `days`: 85 % delivered at once, 10 %
    after one retry, 5 % failed after three attempts."""
    rng = random.Random(seed)
    now = datetime.now(UTC)
    made = n = 0
    while made < count:
        n += 1
        space = rng.choice(SPACES)
        kind = rng.choice(EVENT_TYPES)
        event_id = f"{prefix}_{seed}_{n}"
        delivery = delivery_id_for(event_id, f"ep_{space}")
        payload = body(event_id, space, kind, n)
        start = now - timedelta(seconds=rng.uniform(0, days * 86400))
        roll = rng.random()
        plan = (["delivered"] if roll < 0.85 else ["retrying", "delivered"] if roll < 0.95
                else ["retrying", "retrying", "failed"])
        at = start
        for number, status in enumerate(plan, 1):
            failed = status != c.STATUS_DELIVERED
            next_at = at + timedelta(seconds=10 * 6 ** (number - 1)) if status == "retrying" else None
            yield AttemptRow(
                delivery_id=delivery, attempt=number, event_id=event_id, event_type=kind,
                space_slug=space, environment="live", endpoint_id=f"ep_{space}",
                endpoint_host=f"hooks.{space}.example.com", user_id=f"customer_{n % 50_000}",
                transaction_id=f"order_{n}",
                trigger=c.TRIGGER_INITIAL if number == 1 else c.TRIGGER_RETRY, status=status,
                status_code=500 if failed else 204, status_text="" if failed else "No Content",
                duration_ms=int(rng.lognormvariate(4, 0.6)), error="HTTP 500" if failed else "",
                attempted_at=at, next_attempt_at=next_at, request_body=payload,
                response_excerpt='{"error":"internal"}' if failed else "",
                source_topic=c.EVENTS_TOPIC, source_partition=n % 12, source_offset=n,
                error_kind=rng.choice(ERROR_KINDS) if failed else "",
            )
            made += 1
            if next_at is not None:
                at = next_at
            if made >= count:
                return


def batches(rows: Iterator[AttemptRow], size: int) -> Iterator[list[AttemptRow]]:
    batch: list[AttemptRow] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def timed(fn: Callable[[], Any], runs: int) -> tuple[float, list[float], Any]:
    """(cold ms, warm ms list, last result)."""
    started = time.perf_counter()
    result = fn()
    cold = (time.perf_counter() - started) * 1000
    warm = []
    for _ in range(runs):
        started = time.perf_counter()
        result = fn()
        warm.append((time.perf_counter() - started) * 1000)
    return cold, warm, result


def summary(name: str, cold: float, warm: list[float], extra: str = "") -> None:
    warm = sorted(warm)
    p95 = warm[min(len(warm) - 1, int(len(warm) * 0.95))]
    print(f"{name:46} cold {cold:7.1f} ms | warm median {statistics.median(warm):7.1f} ms, "
          f"p95 {p95:7.1f} ms, max {warm[-1]:7.1f} ms  {extra}")


async def through_writer(store: HistoryStore, rows: int, batch: int, interval: float) -> float:
    prepared = list(attempts(rows, 30, seed=2, prefix="wrt"))  # built before the clock starts
    writer = HistoryWriter(store, Metrics(), batch, interval)
    writer.start()
    started = time.perf_counter()
    futures = [writer.submit(row) for row in prepared]
    await asyncio.gather(*futures)
    elapsed = time.perf_counter() - started
    writer.stop(30)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--writer-rows", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    defaults = Settings()
    batch = defaults.history_batch_rows
    path = tempfile.mkdtemp(prefix="perkamo-bench-history-")
    try:
        store = HistoryStore(f"chdb://{path}")
        store.migrate(defaults.history_ttl_days)
        print(f"embedded engine at {path}; {args.rows:,} attempts in batches of {batch:,}")

        insert_s = generate_s = 0.0
        mark = time.perf_counter()
        for rows in batches(attempts(args.rows, 30, seed=1), batch):
            generate_s += time.perf_counter() - mark
            mark = time.perf_counter()
            store.insert(rows)
            insert_s += time.perf_counter() - mark
            mark = time.perf_counter()
        print(f"HistoryStore.insert: {args.rows / insert_s:,.0f} rows/s "
              f"({insert_s:.1f} s inserting, {generate_s:.1f} s building rows)")

        elapsed = asyncio.run(through_writer(store, args.writer_rows, batch,
                                             defaults.history_flush_interval_s))
        print(f"HistoryWriter (submit -> durable, one future per row): "
              f"{args.writer_rows / elapsed:,.0f} rows/s ({args.writer_rows:,} rows in {elapsed:.1f} s)")

        _, parts = store.query("SELECT count(), sum(rows), formatReadableSize(sum(bytes_on_disk)) "
                               "FROM system.parts WHERE database = 'perkamo' AND active")
        print(f"table: {parts[0][1]:,} rows in {parts[0][0]} active parts, {parts[0][2]} on disk")

        now = datetime.now(UTC)
        flt = DeliveryFilter(space=TARGET, status=c.STATUS_FAILED, since=now - timedelta(hours=24))
        cold, warm, page = timed(lambda: list_deliveries(store, flt, 50), args.runs)
        summary("one Space, last 24 h, failed (list, 50/page)", cold, warm,
                f"-> {len(page.deliveries)} deliveries")
        wide = DeliveryFilter(space=TARGET, since=now - timedelta(hours=24))
        cold, warm, page = timed(lambda: list_deliveries(store, wide, 50), args.runs)
        summary("one Space, last 24 h, any status (list)", cold, warm,
                f"-> {len(page.deliveries)} deliveries on the first page")
        target = page.deliveries[0]["delivery_id"]
        cold, warm, rows_ = timed(lambda: delivery_attempts(store, target), args.runs)
        summary("one delivery by id (all attempts)", cold, warm, f"-> {len(rows_)} attempts")
        params = {"space": TARGET, "since": now - timedelta(hours=24), "until": now, "status": "failed"}
        cold, warm, result = timed(lambda: store.query(REPLAY_SELECTION, params), args.runs)
        summary("replay selection, one Space, 24 h, failed", cold, warm, f"-> {len(result[1])} deliveries")
        _, total = store.query(f"SELECT count() FROM {TABLE} FINAL")
        print(f"deduplicated attempts in the table: {total[0][0]:,}")
        store.close()
    finally:
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
