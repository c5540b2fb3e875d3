"""One size budget for every message the service writes (docs/operations.md, sizes).

The largest event the service accepts (`PERKAMO_MAX_PAYLOAD_BYTES`, P) decides the rest:

- `message_max_bytes` = P + HEADER_ROOM + FRAMING_ROOM: the producer's `message.max.bytes`
  and every topic's `max.message.bytes` (set by `perkamo-webhooks topics`, read back at
  start-up). Any event the service accepts can then be re-published whole (retry tier, held
  topic, dead letter), with the headers the service adds.
- HEADER_ROOM bounds the headers of one message the service writes: its own perkamo-* headers
  (ids ≤ 128 bytes, a dead-letter detail ≤ 500) and the producer's headers kept on a dead
  letter, which are cut to fit (`KEPT_HEADERS_MAX`).
- FRAMING_ROOM covers the record batch's framing and LZ4's worst-case growth of an
  incompressible value (size/255 + 16 bytes: 4.1 KB for 1 MiB).
- An attempt record carries the POSTed body; above `HISTORY_BODY_MAX` bytes (or wherever its
  JSON escaping would push the record past `message_max_bytes`) it carries a cut body, a flag,
  and the full body's length and SHA-256 (consumer.attempts).
- A message that cannot be re-published whole (bigger than the budget, or refused by the
  broker) is dead-lettered as a stub: its headers, the reason, its first STUB_HEAD_BYTES, its
  length and SHA-256, and where it came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

HEADER_ROOM: Final = 16 * 1024
FRAMING_ROOM: Final = 16 * 1024
KEPT_HEADERS_MAX: Final = 8 * 1024  # producer headers kept on a dead letter, all together
HISTORY_BODY_MAX: Final = 256 * 1024  # raw bytes of request_body an attempt record keeps
STUB_HEAD_BYTES: Final = 4096
# librdkafka's own default for message.max.bytes; the topics' broker default is 1,048,588.
LIBRDKAFKA_DEFAULT_MAX: Final = 1_000_000


@dataclass(frozen=True, slots=True)
class SizeBudget:
    """The sizes derived from the largest accepted event."""

    max_event_bytes: int

    @property
    def message_max_bytes(self) -> int:
        """The producer's `message.max.bytes` and each topic's `max.message.bytes`."""
        return self.max_event_bytes + HEADER_ROOM + FRAMING_ROOM

    @property
    def record_max_bytes(self) -> int:
        """An attempt record's value must fit one message with its (few) headers."""
        return self.message_max_bytes - HEADER_ROOM

    def producer_problem(self, configured: int) -> str | None:
        """A sentence if the producer's `message.max.bytes` cannot carry the largest event."""
        if configured >= self.message_max_bytes:
            return None
        return (
            f"PERKAMO_KAFKA_MESSAGE_MAX_BYTES is {configured:,}, but PERKAMO_MAX_PAYLOAD_BYTES "
            f"({self.max_event_bytes:,}) needs at least {self.message_max_bytes:,} (the event plus "
            f"{HEADER_ROOM + FRAMING_ROOM:,} bytes of headers and framing): raise it or unset it"
        )

    def topic_problem(self, topic: str, max_message_bytes: int) -> str | None:
        """A sentence if a topic's `max.message.bytes` cannot take the largest message."""
        if max_message_bytes >= self.message_max_bytes:
            return None
        return (
            f"topic {topic} takes messages up to {max_message_bytes:,} bytes (max.message.bytes), "
            f"but PERKAMO_MAX_PAYLOAD_BYTES ({self.max_event_bytes:,}) needs {self.message_max_bytes:,}: "
            "run `perkamo-webhooks topics` to set it, or lower PERKAMO_MAX_PAYLOAD_BYTES"
        )


def budget_of(max_payload_bytes: int) -> SizeBudget:
    return SizeBudget(max_payload_bytes)
