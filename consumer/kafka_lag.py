"""Consumer lag from librdkafka's statistics, for both roles' group members: one gauge series
per assigned partition, kept honest while the broker is unreachable or a partition is paused
(docs/operations.md, honest signals)."""

from __future__ import annotations

import contextlib
from collections.abc import Container
from typing import Any

import orjson

from consumer.watermarks import WATERMARKS, Watermarks

TP = tuple[str, int]


def record_lag(
    stats_json: str, assigned: Container[TP], gauge: Any, watermarks: Watermarks = WATERMARKS
) -> None:
    """librdkafka statistics (`stats_cb`) -> `gauge.labels(topic, partition).set(lag)` for each
    partition of `assigned`: high watermark minus committed offset.

    Honest during outages (docs/operations.md): a partition whose leader the client cannot
    reach has its series removed (the lag is unknown, and the alerts' `absent()` fires when
    every series is gone); a paused partition, which librdkafka stops fetching, takes the
    high watermark the BrokerWatch last read from the broker when that is newer."""
    try:
        stats: dict[str, Any] = orjson.loads(stats_json)
    except orjson.JSONDecodeError:
        return
    brokers = stats.get("brokers")
    up = None if brokers is None else {  # logical brokers (the group coordinator) have no id
        int(b.get("nodeid", -1)) for b in brokers.values() if b.get("state") == "UP"} - {-1}
    seen: list[TP] = []
    for topic, tstats in stats.get("topics", {}).items():
        for pid, pstats in tstats.get("partitions", {}).items():
            if pid == "-1" or (topic, int(pid)) not in assigned:
                continue
            tp = (topic, int(pid))
            seen.append(tp)
            if up is not None and int(pstats.get("leader", -1)) not in up:
                with contextlib.suppress(KeyError):  # never recorded, or already removed
                    gauge.remove(topic, pid)
                continue
            lag = partition_lag(pstats, watermarks.get(tp))
            if lag is not None:
                gauge.labels(topic, pid).set(lag)
    watermarks.want(seen)


def partition_lag(pstats: dict[str, Any], read_high: int = -1) -> int | None:
    """High watermark (the statistics', or `read_high` from the broker if larger) minus the
    committed offset; with no commit yet, minus the log start.

    librdkafka's own `consumer_lag` is -1 until the group has committed the partition, which
    would hide exactly the backlog of a new group or a never-committed partition.
    """
    high = max(int(pstats.get("hi_offset", -1)), read_high)
    if high < 0:
        return None
    committed = int(pstats.get("committed_offset", -1))
    base = committed if committed >= 0 else int(pstats.get("lo_offset", -1))
    if base < 0:
        return None
    return max(0, high - base)
