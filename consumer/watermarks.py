"""High watermarks read from the broker, for the consumer-lag gauge of paused partitions.

librdkafka's statistics refresh a partition's high watermark only from its fetches, and a
paused partition is not fetched: its lag would freeze at the value it had when it paused (the
history role while its store fails; a deliver partition whose window is full). The
BrokerWatch (consumer.kafka_admin) reads the high watermarks of the partitions
`record_lag` was asked about and leaves them here; `record_lag` takes the larger of the two.
A high watermark is a fact about the partition, not about a consumer, so one book per process
serves every role in it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping

TP = tuple[str, int]

# A partition record_lag has not been asked about for this long is no longer read.
WANTED_FOR_S = 60.0


class Watermarks:
    """Thread-safe: record_lag runs on the consumers' threads, the watch on its own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._high: dict[TP, int] = {}
        self._wanted: dict[TP, float] = {}

    def want(self, tps: Iterable[TP]) -> None:
        now = time.monotonic()
        with self._lock:
            for tp in tps:
                self._wanted[tp] = now

    def wanted(self) -> list[TP]:
        cutoff = time.monotonic() - WANTED_FOR_S
        with self._lock:
            self._wanted = {tp: at for tp, at in self._wanted.items() if at >= cutoff}
            return sorted(self._wanted)

    def update(self, high: Mapping[TP, int]) -> None:
        with self._lock:
            self._high.update(high)
            for tp in [tp for tp in self._high if tp not in self._wanted]:
                del self._high[tp]

    def get(self, tp: TP) -> int:
        """The latest high watermark read from the broker; -1 if none."""
        with self._lock:
            return self._high.get(tp, -1)


WATERMARKS = Watermarks()
