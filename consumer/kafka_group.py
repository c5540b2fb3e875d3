"""One consumer-group member over librdkafka, for both roles' readers (the deliver loop and the
history writer): subscribe with the rebalance hand-off, consume, pause/resume/seek, commit with
per-partition results, and the member's lag from librdkafka's statistics.

Thread ownership: one thread calls a member (the deliver loop's Kafka thread, the history
writer's thread); the rebalance callbacks run on that thread, inside `consume()`, with the
partitions as (topic, partition) pairs. Nothing here knows what the messages mean.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Container, Iterable, Sequence
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from consumer.config import Settings
from consumer.kafka_io import Message, consumer_config, make_client
from consumer.kafka_lag import TP, record_lag

log = logging.getLogger(__name__)

Rebalance = Callable[[list[TP]], None]


class GroupMember:
    def __init__(self, settings: Settings, group_id: str, lag: Any, assigned: Container[TP]) -> None:
        """`lag`: the per-partition lag gauge (labels topic, partition); `assigned`: the
        partitions the owner holds, whose lag is recorded."""
        config = consumer_config(settings, group_id, settings.group_protocol, settings.lag_interval_s)
        config["stats_cb"] = self._on_stats
        self._consumer: Consumer = make_client(Consumer, config)
        self._lag = lag
        self._assigned = assigned

    def subscribe(
        self, topics: Sequence[str], on_assign: Rebalance, on_revoke: Rebalance, on_lost: Rebalance
    ) -> None:
        def pairs(handler: Rebalance) -> Callable[[Consumer, list[TopicPartition]], None]:
            return lambda _, parts: handler([(p.topic, p.partition) for p in parts])

        self._consumer.subscribe(list(topics), on_assign=pairs(on_assign), on_revoke=pairs(on_revoke),
                                 on_lost=pairs(on_lost))

    def consume(self, most: int, timeout: float) -> list[Message]:
        """Up to `most` messages, waiting up to `timeout` for the first."""
        msgs: list[Message] = self._consumer.consume(most, timeout)
        return msgs

    def pause(self, tps: Iterable[TP]) -> None:
        self._consumer.pause([TopicPartition(t, p) for t, p in tps])

    def resume(self, tps: Iterable[TP]) -> None:
        self._consumer.resume([TopicPartition(t, p) for t, p in tps])

    def seek(self, tp: TP, offset: int) -> None:
        """Fetch the partition again from `offset` (messages after it dropped from a batch)."""
        self._consumer.seek(TopicPartition(tp[0], tp[1], offset))

    def commit(self, offsets: Sequence[tuple[TP, int]]) -> list[tuple[TP, int]]:
        """Commit synchronously; returns what was committed. A partition's failure is logged
        and left out; a failure of the whole commit (e.g. no longer in the group) returns []:
        the uncommitted offsets are redelivered to whoever holds the partitions next."""
        if not offsets:
            return []
        try:
            results = self._consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in offsets], asynchronous=False
            )
        except Exception as exc:
            log.warning("commit failed: %s", exc)
            return []
        done = []
        for tp in results or []:
            if tp.error:
                log.warning("commit of %s[%d] failed: %s", tp.topic, tp.partition, tp.error)
                continue
            done.append(((tp.topic, tp.partition), tp.offset))
        return done

    def forget_lag(self, tps: Iterable[TP]) -> None:
        """Remove the lag series of partitions no longer held (a series left behind freezes)."""
        for topic, partition in tps:
            with contextlib.suppress(KeyError):  # no statistics arrived for it yet
                self._lag.remove(topic, str(partition))

    def close(self) -> None:
        """Leave the group (a revoke runs first, on this thread)."""
        self._consumer.close()

    def _on_stats(self, stats_json: str) -> None:
        record_lag(stats_json, self._assigned, self._lag)
