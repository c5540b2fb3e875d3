"""Attempt records on perkamo.webhooks.attempts: the interface other consumers read."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import jsonschema
import orjson
import pytest

from consumer import attempts
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
    with pytest.raises(attempts.BadRecord, match=why):
        attempts.decode(value)
