"""Garbage collection for a long-running delivery process: measured, then tuned.

The deliver role keeps tens of thousands of long-lived objects (the imported modules, the
endpoint registry, compiled schemas) and creates short-lived ones per delivery (a task, a
few futures, a result, a record). CPython's default thresholds (700, 10, 10) make the cyclic
collector walk the long-lived heap again and again: measured at 22 % of the deliver
process's CPU. After start-up `tune()` moves everything alive into the permanent generation
(`gc.freeze()`) and raises the first threshold, so collections are rare and only see young
objects. `watch()` records how long every collection takes, per generation, in
`perkamo_webhook_gc_pause_seconds_total`.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any, Final

from consumer.metrics import Metrics

log = logging.getLogger(__name__)

THRESHOLDS: Final = (50_000, 20, 20)


def tune() -> None:
    """Freeze what start-up left alive and raise the thresholds (call once, when started)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
    log.info("gc: %d objects frozen after start-up, thresholds %s", gc.get_freeze_count(), THRESHOLDS)


def watch(metrics: Metrics) -> None:
    """Count the time spent in each collection (a callback at its start and its stop)."""
    started: list[float] = [0.0]
    children = [metrics.gc_pause.labels(str(generation)) for generation in range(3)]

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        # Thread CPU time: a collection the OS descheduled is not counted as GC.
        if phase == "start":
            started[0] = time.thread_time()
        else:
            children[int(info.get("generation", 0))].inc(time.thread_time() - started[0])

    gc.callbacks.append(on_gc)
