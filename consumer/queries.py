"""Reading delivery history: the inputs a caller gives (times, filters, cursors), the reads
built on the project's SQL (consumer.sql), returning JSON-ready dicts, and the ReadPool every
read of the history API and the console runs on."""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Protocol, TypeVar

import orjson

from consumer.constants import STATUS_DELIVERED, STATUS_FAILED, STATUS_HELD, STATUS_RETRYING
from consumer.errors import BadRequest, SeveralSpaces
from consumer.sql import (
    ATTEMPT_BODY,
    DELIVERIES,
    DELIVERY_SEARCH,
    SEARCH_CANDIDATES,
    SPACE_DELIVERY_ATTEMPTS,
    SPACE_DELIVERY_ATTEMPTS_WITH_BODY,
    SUCCESS_RATES,
)

T = TypeVar("T")

STATUSES: Final = (STATUS_DELIVERED, STATUS_RETRYING, STATUS_HELD, STATUS_FAILED)
# A delivery whose latest attempt is `retrying` and whose next attempt was due longer ago than
# this is stuck (its retry message was lost or the consumer is far behind): it may be resent.
STUCK_AFTER: Final = timedelta(minutes=15)
MAX_LIMIT: Final = 1000
DEFAULT_LIMIT: Final = 50
# Open ends of a time window (DateTime64(3) covers 1900-2299).
EARLIEST: Final = datetime(1970, 1, 1, tzinfo=UTC)
LATEST: Final = datetime(2200, 1, 1, tzinfo=UTC)

_RELATIVE_RE = re.compile(r"^(\d+)\s*(s|m|h|d|w)$")
_RELATIVE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_TEXT_MAX = 256
SEARCH_WINDOW: Final = timedelta(days=30)  # a search without `since` looks this far back
SEARCH_LIMIT: Final = 100
# list_newest_first scans these windows below the page's upper bound before the whole range.
NARROWING_STEPS: Final = (timedelta(hours=1), timedelta(days=1), timedelta(days=7))


class Reader(Protocol):
    """What the reads need of a history store (HistoryStore has it)."""

    def query(
        self, sql: str, parameters: dict[str, Any] | None = None
    ) -> tuple[list[str], list[tuple[Any, ...]]]: ...


# Inputs --------------------------------------------------------------------------------


def parse_time(value: str, now: datetime | None = None, name: str = "time") -> datetime:
    """ISO-8601 (naive means UTC), `now`, or a time ago like `30m`, `24h`, `7d`.

    Returns an aware UTC datetime truncated to milliseconds (the table's precision). Anything
    else, `800000d` included, is a BadRequest naming the parameter (`name`)."""
    shown = repr(value[:40])
    text = value.strip()
    now = now or datetime.now(UTC)
    match = _RELATIVE_RE.match(text) if text.isascii() and len(text) <= 24 else None
    try:
        if match:
            moment = now - timedelta(seconds=int(match.group(1)) * _RELATIVE_UNITS[match.group(2)])
        elif text == "now":
            moment = now
        else:
            if not text.isascii() or len(text) > 40:
                raise ValueError(text)
            moment = datetime.fromisoformat(text)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
        moment = moment.astimezone(UTC)
    except ValueError:
        raise BadRequest(
            f"{name} {shown} is neither ISO-8601 (2026-06-01T10:00:00Z) "
            "nor a time ago like 30m, 24h, 7d"
        ) from None
    except OverflowError:
        raise BadRequest(f"{name} {shown} is out of range (1970 to 2199)") from None
    if not EARLIEST <= moment < LATEST:
        raise BadRequest(f"{name} {shown} is out of range (1970 to 2199)")
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def iso(moment: datetime | None) -> str | None:
    """A time from the store (naive UTC) or from parse_time as ISO-8601 with `Z`."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def check_status(value: str) -> str:
    if value and value not in STATUSES:
        raise BadRequest(f"status must be one of {', '.join(STATUSES)}")
    return value


def check_text(name: str, value: str, required: bool = False) -> str:
    """A free-text filter: bounded, printable."""
    if required and not value:
        raise BadRequest(f"{name} is required")
    if len(value) > _TEXT_MAX or not value.isprintable():
        raise BadRequest(f"{name} must be printable text of at most {_TEXT_MAX} characters")
    return value


def check_range(since: datetime | None, until: datetime | None) -> None:
    if since is not None and until is not None and since >= until:
        raise BadRequest("since must be before until")


def check_span(since: datetime, until: datetime, max_span: timedelta) -> None:
    """A history window is at most PERKAMO_HISTORY_MAX_SPAN_DAYS long."""
    if until - since > max_span:
        days = max_span.total_seconds() / 86400
        raise BadRequest(f"since: the window from since to until is longer than {days:g} days "
                         "(PERKAMO_HISTORY_MAX_SPAN_DAYS); narrow it")


def window(
    flt: DeliveryFilter, max_span: timedelta | None, now: datetime | None = None
) -> tuple[datetime, datetime]:
    """The filter's [since, until): open ends filled in, never longer than max_span.

    Without a `since` the window is the last max_span before `until` (or now)."""
    until = flt.until
    if max_span is None:
        return flt.since or EARLIEST, until or LATEST
    end = until or (now or datetime.now(UTC))
    since = flt.since or max(EARLIEST, end - max_span)
    check_span(since, end, max_span)
    return since, until or LATEST


@dataclass(frozen=True, slots=True)
class DeliveryFilter:
    """Filters of the delivery list; empty strings and None mean "any"."""

    space: str = ""
    status: str = ""
    event_type: str = ""
    since: datetime | None = None
    until: datetime | None = None

    def __post_init__(self) -> None:
        check_text("space", self.space)
        check_text("event_type", self.event_type)
        check_status(self.status)
        check_range(self.since, self.until)

    def fingerprint(self) -> str:
        """Ties a cursor to the filters it was made for. Not to the time window: a relative
        `--since 24h` moves between two pages, and the cursor (the last delivery shown) still
        says where the next page starts."""
        key = "\x00".join([self.space, self.status, self.event_type])
        return hashlib.sha256(key.encode()).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class Page:
    deliveries: list[dict[str, Any]]
    next_cursor: str | None

    def as_json(self) -> dict[str, Any]:
        return {"deliveries": self.deliveries, "next_cursor": self.next_cursor}


def _encode_cursor(flt: DeliveryFilter, last: dict[str, Any]) -> str:
    raw = orjson.dumps(
        {"f": flt.fingerprint(), "t": last["first_attempted_at"], "d": last["delivery_id"]}
    )
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(flt: DeliveryFilter, cursor: str) -> tuple[datetime, str]:
    """The position a cursor names; anything not handed out by this API is a BadRequest
    (a cursor is caller input: its time and id are checked like any other parameter)."""
    forged = BadRequest("cursor is not one this API handed out")
    try:
        if not cursor.isascii() or len(cursor) > 1024:
            raise ValueError(cursor)
        doc = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        at = datetime.fromisoformat(doc["t"])
        delivery_id = doc["d"]
        fingerprint = doc["f"]
    except (ValueError, TypeError, KeyError, IndexError, binascii.Error, orjson.JSONDecodeError):
        raise forged from None
    if not isinstance(fingerprint, str) or not isinstance(delivery_id, str):
        raise forged
    if fingerprint != flt.fingerprint():
        raise BadRequest("cursor belongs to other filters: start again without it")
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    try:
        at = at.astimezone(UTC)
    except OverflowError:
        raise forged from None
    if not EARLIEST <= at <= LATEST or len(delivery_id) > _TEXT_MAX or not delivery_id.isprintable():
        raise forged
    return at, delivery_id


def check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_LIMIT:
        raise BadRequest(f"limit must be between 1 and {MAX_LIMIT}")
    return limit


# Reads ---------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def _dicts(columns: Sequence[str], rows: Sequence[tuple[Any, ...]]) -> list[dict[str, Any]]:
    return [{c: _jsonable(v) for c, v in zip(columns, row, strict=True)} for row in rows]


def list_deliveries(
    store: Reader,
    flt: DeliveryFilter,
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
    max_span: timedelta | None = None,
) -> Page:
    """One page of deliveries (newest first by first attempt) and the cursor of the next page.

    With `max_span` the window is bounded (see `window`)."""
    check_limit(limit)
    after_at, after_id = (LATEST, "") if not cursor else _decode_cursor(flt, cursor)
    since, until = window(flt, max_span)
    columns, rows = store.query(DELIVERIES, {
        "space": flt.space,
        "event_type": flt.event_type,
        "status": flt.status,
        "since": since,
        "until": until,
        "after_at": after_at,
        "after_id": after_id,
        "limit": limit + 1,
    })
    deliveries = _dicts(columns, rows[:limit])
    more = len(rows) > limit
    return Page(deliveries, _encode_cursor(flt, deliveries[-1]) if more else None)


def list_newest_first(
    store: Reader, flt: DeliveryFilter, limit: int = DEFAULT_LIMIT, cursor: str | None = None,
    *, now: datetime | None = None, max_span: timedelta | None = None,
) -> Page:
    """The same page as list_deliveries, found faster on a large table when no Space is given:
    it aggregates the newest hour, day and week below the page's upper bound first, and the
    whole range only when those hold no full page. Exact, because a delivery is placed by its
    first attempt and every later attempt is newer: a window [t, upper) holds exactly the
    deliveries that began in it, all their attempts included, in the same order."""
    if flt.space:  # one Space is one key range of the table's ORDER BY: already cheap
        return list_deliveries(store, flt, limit, cursor, max_span)
    upper = flt.until or (now or datetime.now(UTC))
    if cursor:
        upper = min(upper, _decode_cursor(flt, cursor)[0])
    for step in NARROWING_STEPS:
        since = upper - step
        if flt.since is not None and since <= flt.since:
            break
        page = list_deliveries(store, replace(flt, since=since), limit, cursor, max_span)
        if page.next_cursor is not None:  # more than a page began in the window: it is the answer
            return page
    return list_deliveries(store, flt, limit, cursor, max_span)


def delivery_attempts(
    store: Reader, delivery_id: str, with_body: bool = False, space: str = "", scoped: bool = False,
) -> list[dict[str, Any]]:
    """Every attempt of one delivery in `space`, deduplicated, by attempt number; [] if unknown.

    The Space is a filter of the SQL: an id of another Space gives [], and so does, for a
    `scoped` caller (a Space session), an id with rows in two Spaces. `space` '' reads every
    Space (admins): a caller then checks `spaces_of`."""
    sql = SPACE_DELIVERY_ATTEMPTS_WITH_BODY if with_body else SPACE_DELIVERY_ATTEMPTS
    columns, rows = store.query(sql, {"delivery_id": delivery_id, "space": space, "scoped": scoped})
    return _dicts(columns, rows)


def spaces_of(delivery_id: str, rows: Sequence[dict[str, Any]]) -> str:
    """The one Space of a delivery's rows; SeveralSpaces when they span more than one."""
    spaces = sorted({str(row["space_slug"]) for row in rows})
    if len(spaces) > 1:
        raise SeveralSpaces(
            f"delivery id {delivery_id} has rows in {len(spaces)} Spaces ({', '.join(spaces[:5])}); "
            "name the Space to read one (space=<slug>)"
        )
    return spaces[0] if spaces else ""


def attempt_body(store: Reader, space: str, delivery_id: str, attempt: int) -> str:
    """The request body recorded with one attempt ('' when none)."""
    _, rows = store.query(ATTEMPT_BODY, {"space": space, "delivery_id": delivery_id,
                                         "attempt": attempt})
    return str(_jsonable(rows[0][0])) if rows else ""


def delivery_detail(
    store: Reader, delivery_id: str, with_body: bool = False, space: str = ""
) -> dict[str, Any] | None:
    """A delivery's summary and its attempts in `space` ('' = any, but one), or None if
    history has no row of it there."""
    rows = delivery_attempts(store, delivery_id, with_body, space)
    if not rows:
        return None
    spaces_of(delivery_id, rows)
    attempts = [row for row in rows if row["attempt"] > 0]
    hold = next((row for row in rows if row["attempt"] == 0), None)
    newest = max(rows, key=lambda row: (row["attempted_at"], row["attempt"]))
    return {
        "delivery_id": delivery_id,
        "space": rows[0]["space_slug"],
        "event_id": rows[0]["event_id"],
        "event_type": rows[0]["event_type"],
        "status": newest["status"],
        "attempts": attempts,
        # The hold record, while it is the newest row: held now, or expired while held.
        "hold": hold if hold is newest else None,
    }


def search_deliveries(
    store: Reader, flt: DeliveryFilter, q: str, limit: int = SEARCH_LIMIT,
    max_span: timedelta | None = None,
) -> list[dict[str, Any]]:
    """Deliveries whose delivery id, event id or transaction id is `q`, within the filters;
    the window is [since, until) with since defaulting to SEARCH_WINDOW ago (never open), and
    with `max_span` never longer than that."""
    check_text("q", q, required=True)
    check_limit(limit)
    until = flt.until or LATEST
    end = min(until, datetime.now(UTC))
    since = flt.since or end - (min(SEARCH_WINDOW, max_span) if max_span else SEARCH_WINDOW)
    if max_span is not None:
        check_span(since, end, max_span)
    window = {"space": flt.space, "since": since, "until": until, "q": q.strip()}
    _, found = store.query(SEARCH_CANDIDATES, window)
    if not found:
        return []
    columns, rows = store.query(DELIVERY_SEARCH, {
        **window,
        "event_type": flt.event_type,
        "status": flt.status,
        "candidate_spaces": sorted({str(row[0]) for row in found}),
        "candidates": [str(row[1]) for row in found],
        "limit": limit,
    })
    return _dicts(columns, rows)


def success_rates(
    store: Reader, space: str = "", now: datetime | None = None
) -> dict[str, dict[str, Any]]:
    """Space -> calls and deliveries in the last hour and day (no row: no call in a day)."""
    now = now or datetime.now(UTC)
    columns, rows = store.query(SUCCESS_RATES, {
        "space": space,
        "hour_ago": now - timedelta(hours=1),
        "day_ago": now - timedelta(days=1),
    })
    return {row["space"]: row for row in _dicts(columns, rows)}
