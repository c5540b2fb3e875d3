"""The history role's writer: attempt records from Kafka into ClickHouse, committed after the insert.

It consumes `perkamo.webhooks.attempts` in its own group (PERKAMO_HISTORY_GROUP_ID), gathers
records into batches (PERKAMO_HISTORY_BATCH_ROWS or PERKAMO_HISTORY_FLUSH_INTERVAL_S, whichever
comes first), inserts each batch and only then commits its offsets. So Kafka is the durable
log and the table its projection: if ClickHouse is down the batch is kept and retried with
back-off while the assigned partitions are paused (the consumer keeps polling, so it stays in
the group); the records wait on the topic, memory holds one batch at most, and the deliver role
never notices. A crash re-inserts at most the uncommitted batch; the table's
ReplacingMergeTree key makes that idempotent.

Records that are not attempt records this version can read are counted and skipped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from consumer import attempts
from consumer.config import Settings
from consumer.constants import ATTEMPTS_TOPIC
from consumer.errors import BadRecord
from consumer.kafka_group import GroupMember
from consumer.kafka_io import Message
from consumer.metrics import Metrics
from consumer.models import AttemptRow
from consumer.store_errors import cause_of

log = logging.getLogger(__name__)

TP = tuple[str, int]
Inserter = Callable[[list[AttemptRow]], None]
RowListener = Callable[[list[AttemptRow]], None]

_POLL_S = 0.2
_BACKOFF_MAX_S = 5.0
_REVOKE_BUDGET_S = 10.0


class HistoryIngest:
    """A thread that follows the attempts topic into the store."""

    def __init__(
        self,
        settings: Settings,
        insert: Inserter,
        metrics: Metrics,
        on_rows: RowListener | None = None,
    ) -> None:
        self._settings = settings
        self._insert = insert
        self._metrics = metrics
        self._on_rows = on_rows
        self._batch_rows = settings.history_batch_rows
        self._interval = settings.history_flush_interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._consumer: GroupMember | None = None
        self._assigned: set[TP] = set()
        self._rows: list[AttemptRow] = []
        self._offsets: dict[TP, int] = {}  # next offset to commit once the batch is in
        self._first_at = 0.0
        self.healthy = True
        self.assigned_once = False
        self.abandoned_rows = 0  # given up on (budget or stop): left on the topic, uncommitted

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("HistoryIngest already started")
        self._consumer = GroupMember(self._settings, self._settings.history_group_id,
                                     self._metrics.consumer_lag, self._assigned)
        self._consumer.subscribe([ATTEMPTS_TOPIC], self._on_assign, self._on_revoke, self._on_lost)
        self._thread = threading.Thread(target=self._run, name="history-ingest", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        """The writer's thread is alive (it ends on a stop, or on an error it cannot get past)."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 30.0) -> bool:
        """Insert and commit what is gathered, leave the group; False if rows were left."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("history ingest did not stop within %.0fs", timeout)
                return False
        return not self._rows and not self.abandoned_rows

    # The thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        try:
            while not self._stop.is_set():
                room = self._batch_rows - len(self._rows)
                msgs = consumer.consume(max(1, min(room, 5000)), _POLL_S) if room > 0 else []
                self._gather(msgs)
                if self._rows and (
                    len(self._rows) >= self._batch_rows or time.monotonic() - self._first_at >= self._interval
                ):
                    self._flush(consumer)
            self._flush(consumer, budget_s=self._settings.drain_timeout_s)
        except Exception:
            log.exception("history ingest stopped; attempt records wait on %s", ATTEMPTS_TOPIC)
            self.healthy = False
        finally:
            try:
                consumer.close()
            finally:  # no statistics come any more: a series left behind would freeze
                self._drop(list(self._assigned))

    def _gather(self, msgs: list[Message]) -> None:
        for msg in msgs:
            if msg.error() is not None:
                log.warning("reading %s: %s", ATTEMPTS_TOPIC, msg.error())
                continue
            tp = (msg.topic() or ATTEMPTS_TOPIC, msg.partition() or 0)
            offset = msg.offset() or 0
            self._offsets[tp] = offset + 1
            try:
                row = attempts.decode(msg.value())
            except BadRecord as exc:
                self._metrics.history_records_invalid.inc()
                log.warning("%s[%d]@%d is not an attempt record (%s); skipped", tp[0], tp[1], offset, exc)
                continue
            if not self._rows:
                self._first_at = time.monotonic()
            self._rows.append(row)
        self._metrics.history_buffer_rows.set(len(self._rows))

    def _flush(self, consumer: GroupMember, budget_s: float | None = None) -> None:
        """Insert the batch (retrying while the store fails), then commit its offsets. With a
        budget, or once a stop is asked for, give up after it: the rows stay on the topic,
        uncommitted, for whoever reads it next."""
        if not self._rows:
            return
        give_up = None if budget_s is None else time.monotonic() + budget_s
        if self._insert_retrying(consumer, give_up):
            if self._on_rows is not None:
                self._on_rows(self._rows)
            self._commit(consumer)
        else:
            log.error("%d rows not inserted: they stay on %s, uncommitted", len(self._rows), ATTEMPTS_TOPIC)
            self.abandoned_rows += len(self._rows)
            self._offsets.clear()
        self._rows = []
        self._metrics.history_buffer_rows.set(0)

    def _insert_retrying(self, consumer: GroupMember, give_up: float | None) -> bool:
        """True once the batch is in; while the store fails the assigned partitions are paused
        and the consumer keeps polling (so it stays in the group). False past `give_up`."""
        backoff = 0.2
        paused = False
        try:
            while True:
                started = time.perf_counter()
                try:
                    self._insert(self._rows)
                except Exception as exc:
                    self.healthy = False
                    self._metrics.history_write_errors.inc()
                    log.error("history insert of %d rows failed (%s); keeping them, retrying in %.1fs",
                              len(self._rows), cause_of(exc), backoff)
                else:
                    self.healthy = True
                    self._metrics.history_flush_duration.observe(time.perf_counter() - started)
                    self._metrics.history_rows_written.inc(len(self._rows))
                    return True
                if not paused and self._assigned:
                    consumer.pause(list(self._assigned))
                    paused = True
                wait_until = time.monotonic() + backoff
                while time.monotonic() < wait_until:
                    if give_up is None and self._stop.is_set():  # a stop mid-retry: bounded now
                        give_up = time.monotonic() + self._settings.drain_timeout_s
                    if give_up is not None:
                        wait_until = min(wait_until, give_up)
                        if time.monotonic() >= give_up:
                            return False
                    consumer.consume(1, min(_POLL_S, max(0.0, wait_until - time.monotonic())))
                backoff = min(backoff * 2, _BACKOFF_MAX_S)
        finally:
            if paused and self._assigned:
                consumer.resume(list(self._assigned))

    def _commit(self, consumer: GroupMember) -> None:
        offsets = [(tp, o) for tp, o in self._offsets.items() if tp in self._assigned]
        self._offsets.clear()
        # A failed commit (no longer in the group) is logged: the new owner re-inserts, and the
        # table's key makes that harmless.
        consumer.commit(offsets)

    # Rebalances (on this thread, inside consume) ---------------------------------------------

    def _on_assign(self, tps: list[TP]) -> None:
        self._assigned.update(tps)
        self.assigned_once = True
        self._metrics.assigned_partitions.set(len(self._assigned))

    def _on_revoke(self, tps: list[TP]) -> None:
        """Insert and commit what was gathered before the partitions go to another member."""
        assert self._consumer is not None
        self._flush(self._consumer, budget_s=_REVOKE_BUDGET_S)
        self._drop(tps)

    def _on_lost(self, tps: list[TP]) -> None:
        """Their offsets are no longer ours to commit; the gathered rows are still inserted
        (the new owner inserts them again: the table's key makes that harmless)."""
        lost = set(tps)
        self._offsets = {tp: o for tp, o in self._offsets.items() if tp not in lost}
        self._drop(tps)

    def _drop(self, tps: list[TP]) -> None:
        self._assigned.difference_update(tps)
        if self._consumer is not None:  # no statistics come for them any more: drop the series
            self._consumer.forget_lag(tps)
        self._metrics.assigned_partitions.set(len(self._assigned))
