"""`perkamo-webhooks history | resend | replay`: delivery history for support and operators.

The commands talk to the running consumer's admin API at PERKAMO_ADMIN_LISTEN (docs/support.md):
the embedded history engine opens in one process only, and resend/replay must go through the
consumer's Kafka producer and its double-work guard. With a ClickHouse server as history
(`PERKAMO_HISTORY_DSN=http(s)://…`) `history` reads it directly, consumer or not.
Every call sends a bearer token: reads PERKAMO_ADMIN_READ_TOKEN (or PERKAMO_ADMIN_TOKEN),
resend and replay PERKAMO_ADMIN_TOKEN. Receiver-controlled text (errors, status text) is
printed as plain text, never as Rich markup.

Exit codes: 0 done; 1 failed (consumer unreachable, not found, server error); 2 invalid input;
3 refused as double work (the same selection or delivery was already re-published; --force).
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

import orjson

from consumer.config import Settings
from consumer.errors import PerkamoError
from consumer.queries import (
    DEFAULT_LIMIT,
    STATUSES,
    BadRequest,
    DeliveryFilter,
    delivery_detail,
    iso,
    list_deliveries,
    parse_time,
)

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

# rich and clickhouse-connect are imported by the commands that use them, so that the
# parser (and `perkamo-webhooks health`, the container probe) starts light.

EXIT_FAILED: Final = 1
EXIT_INVALID: Final = 2
EXIT_REFUSED: Final = 3
API: Final = "/api/v1"
_TIMEOUT_S: Final = 120.0
_STATUS_STYLE = {"delivered": "green", "retrying": "yellow", "failed": "red"}
_BUSY_RETRIES: Final = 3
_TIME_HELP = "ISO-8601 (2026-06-01T10:00:00Z; no zone = UTC) or a time ago: 30m, 24h, 7d"


class ApiFailure(PerkamoError):
    """The admin API answered with an error status; `doc` is its JSON answer."""

    def __init__(self, status: int, doc: dict[str, Any]) -> None:
        super().__init__(str(doc.get("error") or f"HTTP {status}"))
        self.status = status
        self.doc = doc


class AdminClient:
    """A small blocking client of the consumer's admin API (stdlib only: nothing to pool)."""

    def __init__(self, settings: Settings, timeout: float = _TIMEOUT_S) -> None:
        host, port = settings.admin_host_port
        if host in ("0.0.0.0", "::", ""):  # noqa: S104 - a wildcard bind is reached on loopback
            host = "127.0.0.1"
        self.base = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        self.token = settings.admin_token.get_secret_value()
        self.read_token = settings.admin_read_token.get_secret_value() or self.token
        self.dsn = settings.history_dsn_resolved
        self.timeout = timeout

    def get(self, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        query = urllib.parse.urlencode({k: v for k, v in (params or {}).items() if v})
        url = f"{self.base}{API}{path}" + (f"?{query}" if query else "")
        headers = {"Authorization": f"Bearer {self.read_token}"} if self.read_token else {}
        for attempt in range(_BUSY_RETRIES + 1):
            try:
                request = urllib.request.Request(url, headers=headers)  # noqa: S310 - admin API
                with self._open(request) as response:
                    return dict(orjson.loads(response.read()))
            except ApiFailure as exc:  # 429: the consumer's history queries are all busy
                if exc.status != 429 or attempt == _BUSY_RETRIES:
                    raise
                time.sleep(1.0 + attempt)
        raise AssertionError("unreachable")

    def post(
        self, path: str, body: dict[str, Any], stream: bool = False
    ) -> Iterator[dict[str, Any]]:
        """POST JSON; yields the answer, or each NDJSON line of a streamed answer."""
        headers = {"Content-Type": "application/json"}
        if stream:
            headers["Accept"] = "application/x-ndjson"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(  # noqa: S310 - http to the admin API
            f"{self.base}{API}{path}", data=orjson.dumps(body), headers=headers, method="POST"
        )
        with self._open(request) as response:
            if "ndjson" not in response.headers.get("Content-Type", ""):
                yield dict(orjson.loads(response.read()))
                return
            for line in response:
                if line.strip():
                    yield dict(orjson.loads(line))

    def _open(self, request: urllib.request.Request) -> Any:
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)  # noqa: S310
        except urllib.error.HTTPError as exc:
            try:
                doc = orjson.loads(exc.read())
            except orjson.JSONDecodeError:
                doc = {}
            raise ApiFailure(exc.code, doc if isinstance(doc, dict) else {}) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            where = f"the running consumer's admin API at {self.base} ({reason})"
            if self.dsn.startswith("chdb://"):
                raise PerkamoError(
                    f"cannot reach {where}. The history is in the embedded engine, which only the "
                    "running consumer can open: start `perkamo-webhooks run`, check "
                    "PERKAMO_ADMIN_LISTEN, or point PERKAMO_HISTORY_DSN at a ClickHouse server."
                ) from None
            raise PerkamoError(f"cannot reach {where}: is `perkamo-webhooks run` up?") from None


def add_subcommands(sub: Any) -> None:
    """Register `history`, `resend` and `replay` on the `perkamo-webhooks` parser."""
    history = sub.add_parser(
        "history",
        help="list deliveries (newest first) or one delivery's attempts",
        description="Deliveries by their first attempt's time, with the status of their latest "
        "attempt. --delivery-id shows every attempt of one delivery (other filters ignored).",
    )
    history.add_argument("--space", default="", help="the Space's slug")
    history.add_argument("--status", choices=STATUSES, help="status of the latest attempt")
    history.add_argument("--event-type", default="", help="e.g. purchase.completed")
    history.add_argument("--since", help=f"first attempt at or after this time; {_TIME_HELP}")
    history.add_argument("--until", help=f"first attempt before this time; {_TIME_HELP}")
    history.add_argument("--delivery-id", help="show every attempt of this delivery")
    history.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help="deliveries per page")
    history.add_argument("--cursor", help="the next page, as printed after a full page")
    history.add_argument("--json", action="store_true", help="print the API's JSON, for scripts")
    history.set_defaults(fn=_history)

    resend = sub.add_parser(
        "resend", help="re-publish one delivery to Kafka (same delivery id, next attempt number)"
    )
    resend.add_argument("delivery_id")
    resend.add_argument("--force", action="store_true",
                        help="resend even if it is still in the retry tiers or was just resent")
    resend.add_argument("--json", action="store_true")
    resend.set_defaults(fn=_resend)

    replay = sub.add_parser(
        "replay",
        help="re-publish a Space's deliveries first attempted in [since, until)",
        description="Deliveries still in the retry tiers are left to them. The same selection "
        "is replayed once: asking again is refused (exit 3) unless --force.",
    )
    replay.add_argument("--space", required=True)
    replay.add_argument("--since", required=True, help=_TIME_HELP)
    replay.add_argument("--until", help=f"default: now; {_TIME_HELP}")
    replay.add_argument("--status", choices=STATUSES, help="only deliveries whose latest attempt "
                        "has this status, e.g. failed")
    replay.add_argument("--dry-run", action="store_true", help="count, publish nothing")
    replay.add_argument("--force", action="store_true",
                        help="replay even what was replayed already")
    replay.add_argument("--json", action="store_true")
    replay.set_defaults(fn=_replay)


# Commands ------------------------------------------------------------------------------


def _history(args: argparse.Namespace, settings: Settings) -> int:
    def fetch() -> dict[str, Any]:
        direct = settings.history_dsn_resolved.startswith(("http://", "https://"))
        if args.delivery_id:
            if direct:
                return _direct_detail(settings, args.delivery_id)
            quoted = urllib.parse.quote(args.delivery_id, safe="")
            return AdminClient(settings).get(f"/deliveries/{quoted}")
        since = parse_time(args.since, name="--since") if args.since else None
        until = parse_time(args.until, name="--until") if args.until else None
        if direct:
            flt = DeliveryFilter(args.space, args.status or "", args.event_type, since, until)
            return _direct_list(settings, flt, args.limit, args.cursor)
        return AdminClient(settings).get("/deliveries", {
            "space": args.space, "status": args.status or "", "event_type": args.event_type,
            "since": iso(since) or "", "until": iso(until) or "", "limit": str(args.limit),
            "cursor": args.cursor or "",
        })

    doc = _call(fetch)
    if isinstance(doc, int):
        return doc
    if args.json:
        _print_json(doc)
    elif args.delivery_id:
        _print_detail(doc)
    else:
        _print_list(doc)
    return 0


def _resend(args: argparse.Namespace, settings: Settings) -> int:
    client = AdminClient(settings)
    path = f"/deliveries/{urllib.parse.quote(args.delivery_id, safe='')}/resend"
    doc = _call(lambda: _one(client.post(path, {"force": args.force})))
    if isinstance(doc, int):
        return doc
    if args.json:
        _print_json(doc)
    else:
        print(f"resent {doc['delivery_id']} as attempt {doc['attempt']} "
              f"(trigger resend, id {doc['resend_id']}, via {doc['topic']})")
    return 0


def _replay(args: argparse.Namespace, settings: Settings) -> int:
    try:
        since = parse_time(args.since, name="--since")
        until = parse_time(args.until, name="--until") if args.until else None
    except BadRequest as exc:
        return _fail(str(exc), EXIT_INVALID)
    body = {"space": args.space, "since": iso(since), "until": iso(until),
            "status": args.status, "dry_run": args.dry_run, "force": args.force}
    window = f"[{iso(since)}, {iso(until) or 'now'})"
    client = AdminClient(settings)
    if args.dry_run:
        doc = _call(lambda: _one(client.post("/replay", body)))
        if isinstance(doc, int):
            return doc
        if args.json:
            _print_json(doc)
        else:
            print(f"dry run, nothing published: {doc['eligible']} of {doc['matched']} matched "
                  f"deliveries of {args.space} first attempted in {window} would be replayed "
                  f"({doc['skipped_in_retry']} still in the retry tiers are left to them); "
                  f"replay id {doc['replay_id']}")
        return 0
    result = _call(lambda: _stream_replay(client, body))
    if isinstance(result, int):
        return result
    if args.json:
        _print_json(result)
    elif not result["matched"]:
        print(f"nothing to replay: no delivery of {args.space} first attempted in {window} "
              + (f"has status {args.status}" if args.status else "exists"))
    else:
        print(f"replay {result['replay_id']}: {result['published']} of {result['matched']} matched "
              f"deliveries of {args.space} first attempted in {window} re-published "
              f"({result['skipped_in_retry']} still in the retry tiers are left to them)")
    return 0


def _stream_replay(client: AdminClient, body: dict[str, Any]) -> dict[str, Any]:
    """POST the replay and follow its progress lines; the bar shows once publishing starts."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = (TextColumn("replaying"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    progress = Progress(*columns, console=Console(stderr=True))
    task = progress.add_task("replay", total=None)
    try:
        for line in client.post("/replay", body, stream=True):
            if "error" in line:
                raise ApiFailure(int(line.get("status", 502)), line)
            if "dry_run" in line:  # nothing to publish: a plain JSON answer, not a stream
                return line
            if "result" in line:
                result = dict(line["result"])
                progress.update(task, total=result["eligible"], completed=result["published"])
                return result
            if not progress.live.is_started:
                progress.start()
            if "matched" in line:
                progress.update(task, total=line["eligible"])
            elif "published" in line:
                progress.update(task, completed=line["published"])
    finally:
        progress.stop()
    raise PerkamoError("the consumer closed the replay stream early: check its log and history")


# Direct reads of a ClickHouse server -----------------------------------------------------


def _direct_store(settings: Settings) -> Any:
    from consumer.history import HistoryStore

    return HistoryStore.from_settings(settings)


def _direct_list(
    settings: Settings, flt: DeliveryFilter, limit: int, cursor: str | None
) -> dict[str, Any]:
    from datetime import timedelta

    store = _direct_store(settings)
    try:
        span = timedelta(days=settings.history_max_span_days)
        return list_deliveries(store, flt, limit, cursor, span).as_json()
    finally:
        store.close()


def _direct_detail(settings: Settings, delivery_id: str) -> dict[str, Any]:
    store = _direct_store(settings)
    try:
        detail = delivery_detail(store, delivery_id)
    finally:
        store.close()
    if detail is None:
        raise ApiFailure(404, {"error": f"history has no attempt of delivery {delivery_id}"})
    return detail


# Output --------------------------------------------------------------------------------


def _one(answers: Iterator[dict[str, Any]]) -> dict[str, Any]:
    try:
        return next(answers)
    finally:
        close = getattr(answers, "close", None)
        if close is not None:
            close()


def _call(fn: Any) -> Any:
    """Run a request; an error becomes a message on stderr and an exit code."""
    try:
        return fn()
    except BadRequest as exc:
        return _fail(str(exc), EXIT_INVALID)
    except ApiFailure as exc:
        if exc.status == 401:
            return _fail(f"{exc} - set PERKAMO_ADMIN_TOKEN to the token the consumer runs with")
        if exc.status == 409:
            earlier = exc.doc.get("replay_id")
            named = not earlier or earlier in str(exc)
            return _fail(f"refused: {exc}" + ("" if named else f" (earlier replay id {earlier})"),
                         EXIT_REFUSED)
        return _fail(str(exc), EXIT_INVALID if exc.status == 400 else EXIT_FAILED)
    except PerkamoError as exc:
        return _fail(str(exc))


def _fail(message: str, code: int = EXIT_FAILED) -> int:
    print(f"perkamo-webhooks: {message}", file=sys.stderr)
    return code


def _print_json(doc: Any) -> None:
    sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")


def _when(value: str | None) -> str:
    if not value:
        return ""
    return datetime.fromisoformat(value).strftime("%Y-%m-%d %H:%M:%S")


def _status(value: str) -> Text:
    from rich.text import Text

    return Text(str(value), style=_STATUS_STYLE.get(value, ""))


def _plain(value: Any) -> Text:
    """Text from history or a receiver, shown as it is: never read as Rich markup."""
    from rich.text import Text

    return Text("" if value is None else str(value))


# History columns of the network timings (consumer.nettiming) -> their column headings.
_TIMINGS: Final = {"dns_ms": "dns", "connect_ms": "connect", "tls_ms": "tls", "ttfb_ms": "ttfb"}


def _maybe(value: Any) -> str:
    """A timing: '' when not measured (an older row, or a step not reached)."""
    return "" if value is None else str(value)


def _console() -> Console:
    from rich.console import Console

    # No markup, no highlighting, no emoji codes: the text shown comes from receivers.
    return Console(markup=False, highlight=False, emoji=False)


def _print_list(doc: dict[str, Any]) -> None:
    from rich.table import Table

    console = _console()
    table = Table(title="deliveries (newest first, times UTC)", title_justify="left")
    for name in ("first attempt", "delivery", "space", "event type", "status", "attempts",
                 "last code", "last error", "last attempt"):
        table.add_column(name, no_wrap=name in ("delivery", "first attempt", "last attempt"))
    for row in doc["deliveries"]:
        table.add_row(
            _when(row["first_attempted_at"]), _plain(row["delivery_id"]), _plain(row["space"]),
            _plain(row["event_type"]), _status(row["status"]), str(row["attempts"]),
            str(row["last_status_code"] or ""), _plain(row["last_error_kind"]),
            _when(row["last_attempted_at"]),
        )
    console.print(table)
    if not doc["deliveries"]:
        console.print("no deliveries match")
    if doc.get("next_cursor"):
        console.print(f"more: add --cursor {doc['next_cursor']}", soft_wrap=True)


def _print_detail(doc: dict[str, Any]) -> None:
    from rich.table import Table
    from rich.text import Text

    console = _console()
    console.print(Text.assemble(
        "delivery ", (str(doc["delivery_id"]), "bold"), f"  space {doc['space']}  ",
        f"event {doc['event_id']} ({doc['event_type']})  status ", _status(doc["status"]),
    ), soft_wrap=True)
    traces = sorted({str(a.get("trace_id") or "") for a in doc["attempts"]} - {""})
    if traces:
        console.print(f"trace {', '.join(traces)}", soft_wrap=True)
    table = Table(title="attempts (times UTC; ms = the whole attempt, then dns, connect, tls and "
                  "time to first byte; 0 = skipped on a kept-alive connection)", title_justify="left")
    for name in ("#", "trigger", "status", "code", "error kind", "ms", *_TIMINGS.values(), "conn",
                 "attempted at", "next attempt", "replay id", "error"):
        table.add_column(name)
    for a in doc["attempts"]:
        reused = a.get("connection_reused")
        table.add_row(
            str(a["attempt"]), _plain(a["trigger"]), _status(a["status"]),
            _plain(f"{a['status_code'] or ''} {a.get('status_text') or ''}".strip()),
            _plain(a["error_kind"]), str(a["duration_ms"]),
            *(_maybe(a.get(column)) for column in _TIMINGS),
            "" if reused is None else ("reused" if reused else "new"),
            _when(a["attempted_at"]), _when(a["next_attempt_at"]), _plain(a["replay_id"]),
            _plain(str(a["error"])[:120]),
        )
    console.print(table)
