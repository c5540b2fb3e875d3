"""Operational events on `perkamo.webhooks.operational` (schemas/operational.schema.json).

The contract asks Spaces to "alert on repeated failures before launching a campaign". These
records let a notifier (email, chat, the Space owner's own webhook) be built on Kafka alone,
without reading history: an endpoint's circuit opened or closed in one deliver process, or a
delivery ended `failed`. Key = the Space's slug, so one Space's events stay in order.
"""

from __future__ import annotations

import os
import socket
from datetime import UTC, datetime
from typing import Any, Final

import orjson

VERSION: Final = 1
CIRCUIT_OPENED: Final = "circuit.opened"
CIRCUIT_CLOSED: Final = "circuit.closed"
DELIVERY_EXHAUSTED: Final = "delivery.exhausted"

WORKER: Final = f"{socket.gethostname()}:{os.getpid()}"


def _base(kind: str, space: str, endpoint_id: str, endpoint_host: str, at: float) -> dict[str, Any]:
    return {
        "version": VERSION,
        "type": kind,
        "at": datetime.fromtimestamp(at, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "space": space,
        "endpoint_id": endpoint_id,
        "endpoint_host": endpoint_host,
        "worker": WORKER,
    }


def circuit_opened(
    space: str, endpoint_id: str, host: str, at: float, *, failure_rate: float, calls: int, cooldown_s: float
) -> bytes:
    doc = _base(CIRCUIT_OPENED, space, endpoint_id, host, at)
    doc.update(failure_rate=round(failure_rate, 4), calls=calls, cooldown_s=cooldown_s)
    return orjson.dumps(doc)


def circuit_closed(space: str, endpoint_id: str, host: str, at: float, *, open_for_s: float) -> bytes:
    doc = _base(CIRCUIT_CLOSED, space, endpoint_id, host, at)
    doc["open_for_s"] = round(open_for_s, 3)
    return orjson.dumps(doc)


def delivery_exhausted(
    space: str,
    endpoint_id: str,
    host: str,
    at: float,
    *,
    delivery_id: str,
    event_id: str,
    event_type: str,
    attempts: int,
    reason: str,
    last_error_kind: str,
    last_status_code: int,
) -> bytes:
    doc = _base(DELIVERY_EXHAUSTED, space, endpoint_id, host, at)
    doc.update(
        delivery_id=delivery_id,
        event_id=event_id,
        event_type=event_type,
        attempts=attempts,
        reason=reason,
        last_error_kind=last_error_kind,
        last_status_code=last_status_code,
    )
    return orjson.dumps(doc)
