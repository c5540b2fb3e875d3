"""consumer.partitions.record_lag: the lag gauge stays honest while a broker is away or a
partition is paused (librdkafka's statistics freeze then)."""

from __future__ import annotations

from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Gauge

from consumer.kafka_lag import record_lag
from consumer.watermarks import Watermarks


def stats(state: str = "UP", hi: int = 100, committed: int = 40, leader: int = 1) -> str:
    doc: dict[str, Any] = {
        "brokers": {"127.0.0.1:9092/1": {"nodeid": 1, "state": state},
                    "GroupCoordinator": {"nodeid": -1, "state": "UP"}},
        "topics": {"t": {"partitions": {
            "0": {"leader": leader, "hi_offset": hi, "lo_offset": 0, "committed_offset": committed},
            "-1": {"leader": -1, "hi_offset": -1},
        }}},
    }
    return orjson.dumps(doc).decode()


def gauge() -> tuple[Gauge, CollectorRegistry]:
    registry = CollectorRegistry()
    return Gauge("lag", "lag", ("topic", "partition"), registry=registry), registry


def value(registry: CollectorRegistry) -> float | None:
    return registry.get_sample_value("lag", {"topic": "t", "partition": "0"})


def test_lag_is_high_watermark_minus_committed() -> None:
    g, registry = gauge()
    book = Watermarks()
    record_lag(stats(), {("t", 0)}, g, book)
    assert value(registry) == 60
    assert book.wanted() == [("t", 0)]


def test_an_unreachable_leader_removes_the_series_and_it_returns_with_the_broker() -> None:
    g, registry = gauge()
    book = Watermarks()
    record_lag(stats(), {("t", 0)}, g, book)
    for down in ("DOWN", "CONNECT", "TRY_CONNECT"):
        record_lag(stats(state=down), {("t", 0)}, g, book)
        assert value(registry) is None  # absent: the alert's absent() sees it, no frozen number
    record_lag(stats(leader=-1), {("t", 0)}, g, book)
    assert value(registry) is None
    record_lag(stats(hi=130), {("t", 0)}, g, book)
    assert value(registry) == 90


def test_a_paused_partition_takes_the_high_watermark_read_from_the_broker() -> None:
    g, registry = gauge()
    book = Watermarks()
    record_lag(stats(hi=100), {("t", 0)}, g, book)
    book.update({("t", 0): 250})  # the statistics still say 100: the partition is not fetched
    record_lag(stats(hi=100), {("t", 0)}, g, book)
    assert value(registry) == 210
    book.update({("t", 0): 90})  # an older read never lowers what the statistics know
    record_lag(stats(hi=100), {("t", 0)}, g, book)
    assert value(registry) == 60


def test_only_assigned_partitions_are_recorded_and_wanted() -> None:
    g, registry = gauge()
    book = Watermarks()
    record_lag(stats(), set(), g, book)
    assert value(registry) is None and book.wanted() == []
    book.update({("t", 0): 5})
    assert book.get(("t", 0)) == -1  # not wanted: not kept


def test_statistics_without_brokers_still_count() -> None:
    g, registry = gauge()
    doc = orjson.loads(stats())
    del doc["brokers"]
    record_lag(orjson.dumps(doc).decode(), {("t", 0)}, g, Watermarks())
    assert value(registry) == 60
