"""Publishing that neither loses a message nor mislabels a delivery (docs/operations.md).

Every message the deliver role writes for an input offset goes through `DurablePublisher`:

- Kafka cannot take it now (brokers down, a leader moving, a timeout, a missing topic): it is
  tried again with back-off for as long as that lasts. The input offset stays uncommitted
  meanwhile, `writes_waiting` is non-zero (the role is not ready, a metric and an alert say so),
  and nothing is dead-lettered or abandoned. A drain or a revoke may cancel the wait: the
  offset is then redelivered, as for any delivery in flight.
- Kafka refused the message itself (its size or form): publishing it again cannot help. A
  stub goes to the dead-letter topic instead (`unpublishable`: the intended headers, the first
  STUB_HEAD_BYTES of the value, its length and SHA-256, the topic it was meant for and where
  the delivery came from), an ERROR line names it, and the offset is released.
- A value bigger than the budget is not tried: it becomes a stub at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from consumer import constants as c
from consumer.budget import KEPT_HEADERS_MAX, STUB_HEAD_BYTES, SizeBudget
from consumer.constants import DlqReason
from consumer.errors import KafkaWriteFailed
from consumer.kafka_io import AsyncProducer, Headers, Message
from consumer.metrics import Metrics

log = logging.getLogger(__name__)

BACKOFF_FIRST_S: Final = 0.2
BACKOFF_MAX_S: Final = 10.0
_DETAIL_MAX: Final = 500


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message to publish, and what it is (for log lines: 'attempt record', 'retry', ...)."""

    topic: str
    value: bytes | None
    key: bytes | str | None
    headers: Headers | None = None
    what: str = "message"


def headers_size(headers: Headers | None) -> int:
    return sum(len(k) + len(v) for k, v in headers or ())


def cut_headers(headers: Headers | None, most: int = KEPT_HEADERS_MAX) -> Headers:
    """The headers in order while they fit in `most` bytes; the rest are left out."""
    out: Headers = []
    size = 0
    for name, value in headers or ():
        size += len(name) + len(value)
        if size > most:
            break
        out.append((name, value))
    return out


def own_reason(out: Outgoing) -> str | None:
    """The dead-letter reason a message already carries (bad input, exhausted, ...), if any."""
    for name, value in out.headers or ():
        if name == c.K_DLQ_REASON:
            return value.decode("ascii", "replace")
    return None


def stub_of(
    out: Outgoing, origin: tuple[str, int, int], reason: str, detail: str
) -> Outgoing:
    """The dead letter that stands for a message Kafka cannot take whole."""
    value = out.value or b""
    had = dict(out.headers or ()).get(c.K_DLQ_DETAIL)
    if had:  # a dead letter's own detail comes first
        detail = f"{had.decode('utf-8', 'replace')}; {detail}"
    kept = [(k, v) for k, v in cut_headers(out.headers) if k not in _STUB_OWN]
    kept += [
        (c.K_DLQ_REASON, reason.encode()),
        (c.K_DLQ_DETAIL, detail.encode("utf-8", "replace")[:_DETAIL_MAX]),
        (c.K_STUB_OF_TOPIC, out.topic.encode()),
        (c.K_VALUE_BYTES, str(len(value)).encode()),
        (c.K_VALUE_SHA256, hashlib.sha256(value).hexdigest().encode()),
        (c.K_ORIGIN_TOPIC, origin[0].encode()),
        (c.K_ORIGIN_PARTITION, str(origin[1]).encode()),
        (c.K_ORIGIN_OFFSET, str(origin[2]).encode()),
    ]
    return Outgoing(c.DLQ_TOPIC, value[:STUB_HEAD_BYTES], out.key, kept, f"stub of a {out.what}")


_STUB_OWN: Final = frozenset({
    c.K_DLQ_REASON, c.K_DLQ_DETAIL, c.K_STUB_OF_TOPIC, c.K_VALUE_BYTES, c.K_VALUE_SHA256,
    c.K_ORIGIN_TOPIC, c.K_ORIGIN_PARTITION, c.K_ORIGIN_OFFSET,
})


class DurablePublisher:
    """Publishes a delivery's messages until Kafka has them (or has refused them for good)."""

    def __init__(self, producer: AsyncProducer, metrics: Metrics, budget: SizeBudget) -> None:
        self._producer = producer
        self._metrics = metrics
        self._budget = budget
        self._waiting = 0
        self._waiting_since = 0.0

    @property
    def writes_waiting(self) -> int:
        """Messages being tried again right now because Kafka could not take them."""
        return self._waiting

    async def publish_all(self, outgoing: Sequence[Outgoing], origin: tuple[str, int, int]) -> None:
        """Every message acknowledged (or stubbed); returns only then."""
        if len(outgoing) == 1:
            await self.publish(outgoing[0], origin)
            return
        results = await asyncio.gather(
            *(self.publish(out, origin) for out in outgoing), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def publish(self, out: Outgoing, origin: tuple[str, int, int]) -> Message | None:
        """One message; None when it was dead-lettered as a stub instead."""
        size = len(out.value or b"") + headers_size(out.headers)
        if size > self._budget.message_max_bytes:
            detail = (f"{out.what} for {out.topic} is {size:,} bytes, over the budget of "
                      f"{self._budget.message_max_bytes:,}")
            await self._stub(out, origin, detail)
            return None
        try:
            return await self._until_taken(out)
        except KafkaWriteFailed as exc:  # permanent: Kafka refused the message itself
            await self._stub(out, origin, f"{out.what} refused by Kafka: {exc.name}")
            return None

    async def _stub(self, out: Outgoing, origin: tuple[str, int, int], detail: str) -> None:
        """A dead letter keeps its own reason (an oversized event stays `oversized`); anything
        else Kafka would not take is `unpublishable`, which an operator must look at."""
        reason = own_reason(out)
        if reason is None:
            reason = DlqReason.UNPUBLISHABLE
            log.error("unpublishable %s for %s from %s[%d]@%d (%s): dead-lettered as a stub, "
                      "offset released", out.what, out.topic, origin[0], origin[1], origin[2], detail)
            self._metrics.child(self._metrics.unpublishable, out.topic).inc()
        else:
            log.warning("%s (%s) from %s[%d]@%d kept as a stub: %s", out.what, reason, *origin, detail)
        stub = stub_of(out, origin, reason, detail)
        try:
            await self._until_taken(stub)
        except KafkaWriteFailed as exc:  # the dead-letter topic refuses even the stub
            log.error("the stub dead letter of a %s for %s from %s[%d]@%d was refused too (%s); "
                      "nothing more can be kept of it", out.what, out.topic, *origin, exc.name)
            return
        self._metrics.dead_lettered.labels(reason).inc()

    async def _until_taken(self, out: Outgoing) -> Message:
        """Publish, trying again while the failure is transient; raises a permanent one."""
        delay = BACKOFF_FIRST_S
        waiting = False
        try:
            while True:
                try:
                    return await self._producer.publish(out.topic, out.value, out.key, out.headers)
                except KafkaWriteFailed as exc:
                    if exc.permanent:
                        raise
                    if not waiting:
                        waiting = True
                        self._wait_begins(out, exc)
                    self._metrics.child(self._metrics.kafka_write_retries, out.topic).inc()
                await asyncio.sleep(delay * (0.5 + random.random() / 2))  # noqa: S311 - jitter
                delay = min(delay * 2, BACKOFF_MAX_S)
        finally:
            if waiting:
                self._wait_ends()

    def _wait_begins(self, out: Outgoing, exc: KafkaWriteFailed) -> None:
        if not self._waiting:  # one line per outage, not one per message
            self._waiting_since = time.monotonic()
            log.warning("Kafka did not take a %s for %s (%s); trying again until it does, offsets "
                        "stay uncommitted meanwhile%s", out.what, out.topic, exc.name, _hint(exc))
        self._waiting += 1
        self._metrics.kafka_writes_waiting.set(self._waiting)

    def _wait_ends(self) -> None:
        self._waiting -= 1
        self._metrics.kafka_writes_waiting.set(self._waiting)
        if not self._waiting:
            log.warning("Kafka takes writes again after %.1fs", time.monotonic() - self._waiting_since)


def _hint(exc: KafkaWriteFailed) -> str:
    """What an operator can do, where the error says it."""
    if exc.name in {"UNKNOWN_TOPIC_OR_PART", "_UNKNOWN_TOPIC"}:
        return f" (topic {exc.topic} is missing: run `perkamo-webhooks topics`)"
    return ""
