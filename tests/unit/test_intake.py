"""consumer.intake.parse_event: valid envelopes become Events, everything else InvalidEvent."""

from __future__ import annotations

import copy
import json
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer.constants import DlqReason
from consumer.errors import InvalidEvent
from consumer.intake import parse_event
from consumer.models import Event

MAX = 1_048_576
DETAIL_MAX = 300


def envelope(**top: Any) -> dict[str, Any]:
    """A valid event envelope (the contract's shape); keyword args replace top-level keys."""
    doc: dict[str, Any] = {
        "id": "evt_01HXYZ",
        "type": "points.earned",
        "created_at": "2024-05-01T12:00:00Z",
        "data": {
            "space": {"slug": "acme-shop", "name": "Acme Shop", "environment": "production"},
            "user_id": "user-42",
            "transaction_id": "txn-7",
            "event": "purchase",
            "status": "completed",
            "occurred_at": "2024-05-01T11:59:59.123+02:00",
            "context": {"channel": "web"},
            "delta": [{"wallet": "points", "amount": 120}],
            "effects": [{"kind": "badge"}],
            "wallet_state": {"points": 1120},
        },
    }
    doc.update(top)
    return doc


def with_path(doc: dict[str, Any], path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    """A deep copy of `doc` with the value at `path` replaced (or removed when value is DELETE)."""
    out = copy.deepcopy(doc)
    node: Any = out
    for part in path[:-1]:
        node = node[part]
    if value is DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return out


DELETE = object()


def encode(doc: Any) -> bytes:
    return orjson.dumps(doc)


def reject(value: bytes | None, max_bytes: int = MAX) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as info:
        parse_event(value, max_bytes)
    assert len(info.value.detail) <= DETAIL_MAX
    return info.value


# Valid input ---------------------------------------------------------------------------


def test_valid_envelope_becomes_an_event() -> None:
    body = encode(envelope())
    event = parse_event(body, MAX)
    assert event == Event(
        body=body,
        id="evt_01HXYZ",
        type="points.earned",
        space_slug="acme-shop",
        environment="production",
        user_id="user-42",
        transaction_id="txn-7",
        text=body.decode(),
    )


def test_body_is_the_exact_input_bytes() -> None:
    # Odd whitespace, key order and escapes must survive: receivers may hash the body.
    body = (
        b'{ "type":"points.earned" ,"id":"e1","created_at":"2024-05-01T12:00:00Z",\n'
        b' "data":{"space":{"environment":"p","slug":"s1"},"user_id":"u\\u00e9",'
        b'"event":"x","status":"ok","occurred_at":"2024-05-01T12:00:00Z","amount":1.50} }'
    )
    event = parse_event(body, MAX)
    assert event.body == body
    assert event.user_id == "ué"


@pytest.mark.parametrize("transaction_id", [None, DELETE])
def test_missing_or_null_transaction_id_is_empty(transaction_id: Any) -> None:
    doc = with_path(envelope(), ("data", "transaction_id"), transaction_id)
    assert parse_event(encode(doc), MAX).transaction_id == ""


def test_exactly_max_bytes_is_accepted() -> None:
    body = encode(envelope())
    assert parse_event(body, len(body)).body == body


# Each reason ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, b""])
def test_empty(value: bytes | None) -> None:
    assert reject(value).reason == DlqReason.EMPTY


def test_oversized_is_checked_before_parsing() -> None:
    body = encode(envelope())
    exc = reject(body, len(body) - 1)
    assert exc.reason == DlqReason.OVERSIZED
    assert str(len(body)) in exc.detail
    assert reject(b"x" * 2000, 1024).reason == DlqReason.OVERSIZED  # not even JSON


@pytest.mark.parametrize(
    "value",
    [
        b"{",
        b"not json",
        b'{"id": "e1",}',
        b'"\xff\xfe"',  # invalid UTF-8
        b'{"id": "\xc3\x28"}',  # invalid UTF-8 continuation
        b'"\\ud800"',  # lone surrogate escape
        b"NaN",
        b'{"x": NaN}',
        b"[Infinity]",
        b"[1e400]",  # overflows to infinity
        b"[" * 1025 + b"]" * 1025,  # deeper than orjson's limit
        b'{"a":' * 2000 + b"1" + b"}" * 2000,
        b"\x00",
    ],
)
def test_invalid_json(value: bytes) -> None:
    assert reject(value).reason == DlqReason.INVALID_JSON


@pytest.mark.parametrize(
    ("path", "value"),
    [
        # wrong types
        (("id",), 123),
        (("type",), None),
        (("data",), []),
        (("data", "space"), "acme-shop"),
        (("data", "user_id"), 42),
        (("data", "transaction_id"), 7),
        (("data", "context"), []),
        (("data", "delta"), {}),
        (("data", "delta"), [{"wallet": "points", "amount": "120"}]),
        (("data", "effects"), "none"),
        # missing fields
        (("id",), DELETE),
        (("type",), DELETE),
        (("created_at",), DELETE),
        (("data",), DELETE),
        (("data", "space"), DELETE),
        (("data", "space", "slug"), DELETE),
        (("data", "space", "environment"), DELETE),
        (("data", "user_id"), DELETE),
        (("data", "event"), DELETE),
        (("data", "status"), DELETE),
        (("data", "occurred_at"), DELETE),
        (("data", "delta"), [{"wallet": "points"}]),
        # bad strings
        (("id",), ""),
        (("id",), "has space"),
        (("type",), "points"),  # needs a dot
        (("type",), "Points.Earned"),
        (("data", "space", "slug"), "Acme"),
        (("data", "space", "slug"), "-acme"),
        (("data", "space", "slug"), "acme_shop"),
        (("data", "space", "slug"), "a" * 64),
        (("data", "space", "slug"), "acme\n"),  # a header-injection attempt
        (("type",), "points.earned\r\nx-evil: 1"),
        (("data", "user_id"), ""),
        (("data", "user_id"), "u" * 257),
        # bad date-times
        (("created_at",), "yesterday"),
        (("created_at",), "2024-05-01"),
        (("created_at",), "2024-05-01 12:00:00"),
        (("created_at",), "2024-05-01T12:00:00"),  # no offset
        (("created_at",), "2024-13-45T25:61:00Z"),
        (("created_at",), "2024-02-30T00:00:00Z"),
        (("data", "occurred_at"), "12:00:00Z"),
        (("data", "occurred_at"), ""),
    ],
)
def test_schema(path: tuple[str, ...], value: Any) -> None:
    exc = reject(encode(with_path(envelope(), path, value)))
    assert exc.reason == DlqReason.SCHEMA


@pytest.mark.parametrize("value", [b"[]", b"1", b'"text"', b"null", b"true", b"{}"])
def test_schema_for_non_envelope_json(value: bytes) -> None:
    assert reject(value).reason == DlqReason.SCHEMA


def test_schema_detail_names_the_path_and_rule() -> None:
    exc = reject(encode(with_path(envelope(), ("data", "space", "slug"), "BAD")))
    assert "space.slug" in exc.detail
    assert "pattern" in exc.detail
    assert str(exc) == f"{DlqReason.SCHEMA}: {exc.detail}"


# Fuzz ----------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)

STRING_PATHS = [
    ("id",),
    ("type",),
    ("created_at",),
    ("data", "space", "slug"),
    ("data", "space", "environment"),
    ("data", "user_id"),
    ("data", "event"),
    ("data", "status"),
    ("data", "occurred_at"),
]
ANY_PATHS = [
    *STRING_PATHS,
    ("data",),
    ("data", "space"),
    ("data", "space", "name"),
    ("data", "transaction_id"),
    ("data", "context"),
    ("data", "delta"),
    ("data", "delta", 0),
    ("data", "delta", 0, "amount"),
    ("data", "effects"),
    ("data", "wallet_state"),
]


def check_outcome(value: bytes) -> InvalidEvent | Event:
    try:
        event = parse_event(value, MAX)
    except InvalidEvent as exc:
        assert len(exc.detail) <= DETAIL_MAX
        return exc
    assert event.body == value
    return event


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(value: bytes) -> None:
    check_outcome(value)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_fuzz_arbitrary_json(value: Any) -> None:
    # json.dumps (not orjson) so big ints, NaN and Infinity reach the parser too.
    check_outcome(json.dumps(value).encode())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(ANY_PATHS), json_values)
def test_fuzz_envelope_with_one_field_replaced(path: tuple[str | int, ...], value: Any) -> None:
    check_outcome(json.dumps(with_path(envelope(), path, value)).encode())


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(STRING_PATHS),
    st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=24, max_size=64),
    st.sampled_from(["string", "nested", "list"]),
)
def test_schema_detail_never_echoes_payload_values(
    path: tuple[str, ...], letters: str, shape: str
) -> None:
    # A long, unique marker that breaks the rule for each string field (space, uppercase,
    # over every maxLength) - placed as the value itself, or as the wrong type around it.
    marker = "MARKER " + letters + "Z" * 300
    value: Any = {"string": marker, "nested": {"v": marker}, "list": [marker]}[shape]
    exc = check_outcome(json.dumps(with_path(envelope(), path, value)).encode())
    assert isinstance(exc, InvalidEvent)
    assert exc.reason == DlqReason.SCHEMA
    assert letters not in exc.detail
    assert letters not in str(exc)
