"""Attempt records on `perkamo.webhooks.attempts`: one per attempt (and per hold record).

Kafka is the durable log; the history table is its projection. The deliver role produces a
record for every row of `perkamo.webhook_attempts` (key = delivery id) and commits its input
offset only once Kafka acknowledged it; the history role consumes the topic and inserts. Any
other consumer (billing, notifications, a data lake) may read the same records: the format is
an interface, `schemas/attempt.schema.json`, versioned by its `v` field (docs/attempts.md).

The record is the history row's fields as JSON (orjson): times ISO-8601 in UTC with `Z`,
`request_body` the exact POSTed body as a string (an event body is valid UTF-8 JSON, so the
bytes come back exactly with `.encode()`).
"""

from __future__ import annotations

from dataclasses import fields
from datetime import datetime
from typing import Any, Final

import orjson

from consumer.errors import PerkamoError
from consumer.models import AttemptRow

VERSION: Final = 1
COLUMNS: Final[tuple[str, ...]] = tuple(f.name for f in fields(AttemptRow))
# Fields added after version 1 was first published: optional, so older records still read.
OPTIONAL: Final = frozenset({
    "error_kind", "replay_id", "pending_attempt", "trace_id", "span_id", "dns_ms", "connect_ms",
    "tls_ms", "ttfb_ms", "connection_reused", "cert_not_after",
})
_REQUIRED: Final = frozenset(COLUMNS) - OPTIONAL
_TIMES: Final = ("attempted_at", "next_attempt_at", "cert_not_after")
_OPTIONS: Final = orjson.OPT_UTC_Z | orjson.OPT_NAIVE_UTC


class BadRecord(PerkamoError):
    """A message on the attempts topic that is not an attempt record this version can read."""


def encode(row: AttemptRow) -> bytes:
    """One record: the row's fields (orjson serializes the dataclass natively) plus `v`."""
    return b'{"v":1,' + orjson.dumps(row, option=_OPTIONS)[1:]


def decode(value: bytes | None) -> AttemptRow:
    """The row of one record; BadRecord says why a message cannot be one."""
    if not value:
        raise BadRecord("empty value")
    try:
        doc: Any = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise BadRecord(f"not JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise BadRecord("not a JSON object")
    version = doc.pop("v", None)
    if version != VERSION:
        raise BadRecord(f"version {version!r}, this reader knows {VERSION}")
    missing = _REQUIRED - doc.keys()
    if missing:
        raise BadRecord(f"missing fields: {', '.join(sorted(missing))}")
    try:
        for name in _TIMES:
            if doc.get(name) is not None:
                doc[name] = datetime.fromisoformat(doc[name])
        known = {k: v for k, v in doc.items() if k in COLUMNS}  # newer optional fields are skipped
        return AttemptRow(**known)
    except (TypeError, ValueError) as exc:
        raise BadRecord(f"bad field ({exc})") from None
