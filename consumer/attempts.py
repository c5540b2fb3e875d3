"""Attempt records on `perkamo.webhooks.attempts`: one per attempt (and per hold record).

Kafka is the durable log; the history table is its projection. The deliver role produces a
record for every row of `perkamo.webhook_attempts` (key = delivery id) and commits its input
offset only once Kafka acknowledged it; the history role consumes the topic and inserts. Any
other consumer (billing, notifications, a data lake) may read the same records: the format is
an interface, `schemas/attempt.schema.json`, versioned by its `v` field (docs/attempts.md).

The record is the history row's fields as JSON (orjson): times ISO-8601 in UTC with `Z`,
`request_body` the exact POSTed body as a string (an event body is valid UTF-8 JSON, so the
bytes come back exactly with `.encode()`).

A record always fits one Kafka message (`len(encode(row)) <= record_max_bytes`, for any row):
a body over HISTORY_BODY_MAX bytes is cut there, and cut further wherever JSON escaping (a `"`
doubles, a control character becomes six bytes) would push the record past the budget; a cut
record says so (`request_body_truncated`) and carries the whole body's length and SHA-256, so
a resend can find and check the original on its source topic (consumer.originals). The receiver
always gets the whole body: only the record is cut.
"""

from __future__ import annotations

import hashlib
from dataclasses import fields, replace
from datetime import datetime
from typing import Any, Final

import orjson

from consumer.budget import HISTORY_BODY_MAX, budget_of
from consumer.config import Settings
from consumer.errors import BadRecord
from consumer.models import AttemptRow

VERSION: Final = 1
COLUMNS: Final[tuple[str, ...]] = tuple(f.name for f in fields(AttemptRow))
# Fields added after version 1 was first published: optional, so older records still read.
OPTIONAL: Final = frozenset({
    "error_kind", "replay_id", "pending_attempt", "trace_id", "span_id", "dns_ms", "connect_ms",
    "tls_ms", "ttfb_ms", "connection_reused", "cert_not_after",
    "request_body_truncated", "request_body_bytes", "request_body_sha256",
})
_REQUIRED: Final = frozenset(COLUMNS) - OPTIONAL
_TIMES: Final = ("attempted_at", "next_attempt_at", "cert_not_after")
_OPTIONS: Final = orjson.OPT_UTC_Z | orjson.OPT_NAIVE_UTC


# The most an attempt record's value may be with the default PERKAMO_MAX_PAYLOAD_BYTES.
RECORD_MAX_BYTES: Final = budget_of(Settings.model_fields["max_payload_bytes"].default).record_max_bytes
# Text fields other than the body, cut (first to this many characters, then a quarter of it
# at a time) only when a record would not fit even with an empty body: no row the service
# writes comes near it (ids are validated, status text and errors capped, the response
# excerpt is at most 64 KiB), so only a forged row loses text here.
_TEXT_CAP: Final = 65_536
_OTHER_TEXTS: Final = tuple(
    f.name for f in fields(AttemptRow)
    if f.type == "str" and f.name not in ("request_body", "request_body_sha256")
)


def encode(row: AttemptRow, record_max_bytes: int = RECORD_MAX_BYTES) -> bytes:
    """One record: the row's fields (orjson serializes the dataclass natively) plus `v`, at
    most `record_max_bytes` long (the budget's `record_max_bytes`): the body is cut to fit.

    ValueError if `record_max_bytes` cannot hold even a record of empty texts (under 1 KB)."""
    try:
        return _encode(row, record_max_bytes)
    except (orjson.JSONEncodeError, UnicodeEncodeError):
        # A lone surrogate: no decoded body or response has one, a forged row might.
        return _encode(_valid_unicode(row), record_max_bytes)


def _encode(row: AttemptRow, limit: int) -> bytes:
    body = row.request_body
    if len(body) * 4 > HISTORY_BODY_MAX and _utf8_len(body) > HISTORY_BODY_MAX:
        row = _cut(row, _utf8_prefix(body, HISTORY_BODY_MAX))
    value = _dumps(row)
    if len(value) <= limit:
        return value
    return _fitted(row, limit)


def _dumps(row: AttemptRow) -> bytes:
    return b'{"v":1,' + orjson.dumps(row, option=_OPTIONS)[1:]


def _fitted(row: AttemptRow, limit: int) -> bytes:
    """The record cut to `limit`: other texts capped only as far as an empty body needs,
    then the longest body prefix whose escaped form fits the room left."""
    cap = _TEXT_CAP
    while True:
        capped = _capped(row, cap)
        room = limit - len(_dumps(_cut(capped, "")))  # "" keeps its two quotes in the count
        if room >= 0:
            break
        if cap == 0:
            raise ValueError(f"an attempt record cannot fit {limit} bytes, even with empty texts")
        cap //= 4
    whole = _dumps(capped)
    if len(whole) <= limit:  # the body fits whole once the other texts are capped
        return whole
    return _dumps(_cut(capped, _escaped_prefix(capped.request_body, room)))


def _cut(row: AttemptRow, text: str) -> AttemptRow:
    """The row with `text` (a prefix of its body) as body, flagged, with the whole body's
    length and SHA-256 (kept from the row if it was cut before)."""
    if row.request_body_truncated:
        return replace(row, request_body=text)
    whole = row.request_body.encode()
    return replace(
        row, request_body=text, request_body_truncated=True,
        request_body_bytes=len(whole), request_body_sha256=hashlib.sha256(whole).hexdigest(),
    )


def _capped(row: AttemptRow, cap: int) -> AttemptRow:
    long = {name: getattr(row, name)[:cap] for name in _OTHER_TEXTS if len(getattr(row, name)) > cap}
    return replace(row, **long) if long else row


def _escaped_prefix(text: str, room: int) -> str:
    """The longest prefix of `text` whose JSON string (quotes aside) is at most `room` bytes.
    A str prefix always ends on a character, so the UTF-8 bytes end on a character boundary."""
    lo, hi = 0, min(len(text), room)  # every character takes at least one byte
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(orjson.dumps(text[:mid])) - 2 <= room:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo]


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode())


def _utf8_prefix(text: str, limit: int) -> str:
    """The longest prefix of `text` of at most `limit` UTF-8 bytes (a character cut in two is
    dropped whole)."""
    return text.encode()[:limit].decode("utf-8", "ignore")


def _valid_unicode(row: AttemptRow) -> AttemptRow:
    texts = {f.name: getattr(row, f.name) for f in fields(AttemptRow) if f.type == "str"}
    return replace(row, **{name: value.encode("utf-8", "replace").decode() for name, value in texts.items()})


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
