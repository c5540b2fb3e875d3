"""Attempt records on perkamo.webhooks.attempts: the interface other consumers read."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

import jsonschema
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer import attempts
from consumer.budget import HISTORY_BODY_MAX, budget_of
from consumer.errors import BadRecord
from consumer.models import AttemptRow

SCHEMA = orjson.loads((Path(__file__).resolve().parents[2] / "schemas" / "attempt.schema.json").read_bytes())


def row(**changes: object) -> AttemptRow:
    values = dict(
        delivery_id="dlv_abc", attempt=2, event_id="evt_1", event_type="purchase.completed",
        space_slug="commerce-live", environment="live", endpoint_id="ep_x", endpoint_host="api.example.com",
        user_id="customer_123", transaction_id="order_1092", trigger="retry", status="retrying",
        status_code=503, status_text="Service Unavailable", duration_ms=41, error="HTTP 503",
        attempted_at=datetime(2026, 6, 1, 10, 0, 3, 123000, tzinfo=UTC),
        next_attempt_at=datetime(2026, 6, 1, 10, 0, 15, tzinfo=UTC),
        request_body='{"id":"evt_1","data":{"note":"Příliš žluťoučký"}}', response_excerpt="busy",
        source_topic="perkamo.events", source_partition=2, source_offset=1092, error_kind="http_status",
    )
    values.update(changes)
    return AttemptRow(**values)  # type: ignore[arg-type]


def test_a_record_is_valid_against_its_schema_and_round_trips() -> None:
    original = row()
    value = attempts.encode(original)
    doc = orjson.loads(value)
    jsonschema.validate(doc, SCHEMA)
    assert doc["v"] == 1
    assert doc["attempted_at"] == "2026-06-01T10:00:03.123000Z"
    assert attempts.decode(value) == original


def test_the_body_comes_back_byte_for_byte() -> None:
    body = '{"id":"evt_1","data":{"emoji":"\U0001f389","quote":"a \\"b\\""}}'
    assert attempts.decode(attempts.encode(row(request_body=body))).request_body.encode() == body.encode()


def test_a_hold_record_is_a_record_too() -> None:
    hold = row(attempt=0, pending_attempt=3, status="held", status_code=0, next_attempt_at=None)
    jsonschema.validate(orjson.loads(attempts.encode(hold)), SCHEMA)
    assert attempts.decode(attempts.encode(hold)).pending_attempt == 3


def test_unknown_fields_of_a_later_version_are_skipped() -> None:
    doc = orjson.loads(attempts.encode(row()))
    doc["a_field_of_a_later_release"] = 3
    assert attempts.decode(orjson.dumps(doc)) == row()


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (b"", "empty"),
        (b"{not json", "not JSON"),
        (b"[]", "not a JSON object"),
        (b'{"v": 2}', "version 2"),
        (b'{"v": 1, "delivery_id": "d"}', "missing fields"),
    ],
)
def test_what_is_not_a_record_says_why(value: bytes, why: str) -> None:
    with pytest.raises(BadRecord, match=why):
        attempts.decode(value)


# The cut: a record always fits its budget ---------------------------------------------------

DEFAULT_LIMIT = budget_of(1_048_576).record_max_bytes
SMALLEST_LIMIT = budget_of(1024).record_max_bytes  # PERKAMO_MAX_PAYLOAD_BYTES' floor


def body_of(filler: str, size: int) -> str:
    """A JSON event body of exactly `size` UTF-8 bytes, its note made of `filler`."""
    head, tail = '{"id":"evt_1","data":{"note":"', '"}}'
    room = size - len(head) - len(tail)
    unit = len(filler.encode())
    return head + "a" * (room % unit) + filler * (room // unit) + tail


def check_cut(original: str, value: bytes, limit: int) -> AttemptRow:
    """The record fits, is valid, and its cut body is a prefix of the original with its
    length and SHA-256; returns the decoded row."""
    assert len(value) <= limit
    jsonschema.validate(orjson.loads(value), SCHEMA)
    back = attempts.decode(value)
    whole = original.encode()
    assert back.request_body_truncated
    assert whole.startswith(back.request_body.encode())
    assert len(back.request_body.encode()) < len(whole)
    assert back.request_body_bytes == len(whole)
    assert back.request_body_sha256 == hashlib.sha256(whole).hexdigest()
    return back


def test_a_body_of_exactly_the_history_limit_is_kept_whole_and_one_byte_more_is_cut() -> None:
    at_limit = body_of("a", HISTORY_BODY_MAX)
    kept = attempts.decode(attempts.encode(row(request_body=at_limit)))
    assert kept.request_body == at_limit
    assert (kept.request_body_truncated, kept.request_body_bytes, kept.request_body_sha256) == (False, 0, "")
    past = body_of("a", HISTORY_BODY_MAX + 1)
    cut = check_cut(past, attempts.encode(row(request_body=past)), DEFAULT_LIMIT)
    assert len(cut.request_body.encode()) == HISTORY_BODY_MAX


def test_a_character_across_the_limit_is_dropped_whole() -> None:
    body = "a" * (HISTORY_BODY_MAX - 2) + "\U0001f389" + "b" * 10  # the emoji's 4 bytes straddle
    cut = check_cut(body, attempts.encode(row(request_body=body)), DEFAULT_LIMIT)
    assert cut.request_body == "a" * (HISTORY_BODY_MAX - 2)


def test_a_quote_heavy_600_kb_event_fits_its_record() -> None:
    body = body_of('\\"', 600_000)  # 600 KB of escaped quotes: each byte doubles in the record
    value = attempts.encode(row(request_body=body))
    cut = check_cut(body, value, DEFAULT_LIMIT)
    assert len(cut.request_body.encode()) == HISTORY_BODY_MAX  # 256 KiB escape to 512 KiB: fits
    assert len(value) < DEFAULT_LIMIT


@pytest.mark.parametrize(
    "filler",
    ['"', "\x01", "\U0001f389", "\\", "\n", "\u2028"],
    ids=["quotes", "control", "4-byte", "backslashes", "newlines", "line-separator"],
)
@pytest.mark.parametrize("limit", [SMALLEST_LIMIT, DEFAULT_LIMIT])
def test_hostile_bodies_fit_at_the_limit_and_one_past_it(filler: str, limit: int) -> None:
    """Find the body length whose record is exactly `limit` bytes: it is kept whole; one more
    character and the body is cut, the record still at most `limit`."""
    escaped = len(orjson.dumps(filler)) - 2
    empty = len(attempts.encode(row(request_body="")))
    n = (min(limit, HISTORY_BODY_MAX * escaped // len(filler.encode())) - empty) // escaped
    padding = (limit - empty - n * escaped) if n * len(filler.encode()) < HISTORY_BODY_MAX else 0
    body = "a" * padding + filler * n
    # With the default budget only a six-byte escape reaches the record limit before the body
    # reaches HISTORY_BODY_MAX (whose own limit is tested above); the rest are cut there first.
    if len(body.encode()) <= HISTORY_BODY_MAX:
        value = attempts.encode(row(request_body=body), limit)
        assert len(value) == limit
        assert attempts.decode(value).request_body == body
    past = body + filler
    check_cut(past, attempts.encode(row(request_body=past), limit), limit)
    huge = filler * (2 * limit)
    check_cut(huge, attempts.encode(row(request_body=huge), limit), limit)


def test_receiver_text_is_capped_when_even_an_empty_body_would_not_fit() -> None:
    hostile = "\x00" * 100_000  # six bytes each once escaped
    forged = row(response_excerpt=hostile, status_text=hostile, error=hostile, request_body="x" * 5000)
    value = attempts.encode(forged, SMALLEST_LIMIT)
    assert len(value) <= SMALLEST_LIMIT
    back = attempts.decode(value)
    assert hostile.startswith(back.response_excerpt) and len(back.response_excerpt) < len(hostile)


def test_a_cut_record_cut_again_keeps_the_whole_bodys_length_and_hash() -> None:
    body = body_of('\\"', 600_000)
    first = attempts.decode(attempts.encode(row(request_body=body)))
    again = check_cut(body, attempts.encode(first, SMALLEST_LIMIT), SMALLEST_LIMIT)
    assert len(again.request_body) < len(first.request_body)


def test_a_lone_surrogate_is_replaced_not_a_failure() -> None:
    value = attempts.encode(row(response_excerpt="a\ud800b", request_body="{\udfff}"))
    back = attempts.decode(value)
    assert back.response_excerpt == "a?b" and back.request_body == "{?}"


def test_a_budget_too_small_for_any_record_says_so() -> None:
    with pytest.raises(ValueError, match="cannot fit 200 bytes"):
        attempts.encode(row(), 200)


def test_a_record_of_an_older_writer_reads_as_whole() -> None:
    doc = orjson.loads(attempts.encode(row()))
    for name in ("request_body_truncated", "request_body_bytes", "request_body_sha256"):
        del doc[name]
    back = attempts.decode(orjson.dumps(doc))
    assert (back.request_body_truncated, back.request_body_bytes, back.request_body_sha256) == (False, 0, "")


HOSTILE_TEXT = st.text(
    alphabet=st.sampled_from(['"', "\\", "\x00", "\x1f", "\n", "a", "é", "\u2028", "\U0001f389", "\ud800"]),
    max_size=6000,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=HOSTILE_TEXT,
    excerpt=HOSTILE_TEXT,
    status_text=HOSTILE_TEXT,
    user_id=HOSTILE_TEXT,
    limit=st.integers(min_value=2000, max_value=40_000),
)
def test_every_record_fits_its_budget(
    body: str, excerpt: str, status_text: str, user_id: str, limit: int
) -> None:
    original = row(request_body=body, response_excerpt=excerpt, status_text=status_text, user_id=user_id)
    value = attempts.encode(original, limit)
    assert len(value) <= limit
    back = attempts.decode(value)
    sent = body.encode("utf-8", "replace").decode()  # a lone surrogate is replaced
    if back.request_body_truncated:
        assert sent.encode().startswith(back.request_body.encode())
        assert back.request_body_sha256 == hashlib.sha256(sent.encode()).hexdigest()
        assert back.request_body_bytes == len(sent.encode())
    else:
        assert back.request_body == sent
