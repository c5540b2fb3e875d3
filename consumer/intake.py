"""Turn a Kafka message value into a validated Event, or say exactly why not (docs/delivery-contract.md)."""

from __future__ import annotations

from typing import Any

import fastjsonschema
import orjson

from consumer.constants import DlqReason
from consumer.errors import InvalidEvent
from consumer.models import Event
from consumer.schemas import validator

_DETAIL_MAX = 300


def parse_event(value: bytes | None, max_bytes: int) -> Event:
    """Parse and validate one event envelope; raise InvalidEvent with a reason on bad input.

    The body that will be POSTed is the message value itself: it was serialized once by
    the publisher, and re-serializing could change bytes the receiver may hash.
    """
    if not value:
        raise InvalidEvent(DlqReason.EMPTY, "message has no value")
    if len(value) > max_bytes:
        raise InvalidEvent(DlqReason.OVERSIZED, f"{len(value)} bytes > limit {max_bytes}")
    try:
        doc: Any = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent(DlqReason.INVALID_JSON, _clip(str(exc))) from None
    try:
        validator("event.schema.json")(doc)
    except fastjsonschema.JsonSchemaException as exc:
        raise InvalidEvent(DlqReason.SCHEMA, _clip(_schema_message(exc))) from None
    data = doc["data"]
    space = data["space"]
    return Event(
        body=value,
        id=doc["id"],
        type=doc["type"],
        space_slug=space["slug"],
        environment=space["environment"],
        user_id=data["user_id"],
        transaction_id=data.get("transaction_id") or "",
        text=value.decode(),
    )


def _schema_message(exc: fastjsonschema.JsonSchemaException) -> str:
    # fastjsonschema names the path ("data.data.space.slug must match pattern ...") and, for
    # some rules, echoes the offending value; keep the path and the rule, drop the value.
    message = str(getattr(exc, "message", exc))
    rule = getattr(exc, "rule", None)
    name = getattr(exc, "name", None)
    if name and rule:
        return f"{name} violates {rule}"
    return message


def _clip(text: str) -> str:
    return text if len(text) <= _DETAIL_MAX else text[: _DETAIL_MAX - 1] + "…"
