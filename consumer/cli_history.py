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
import urllib.parse
from collections.abc import Iterator
from typing import Any, Final

from consumer import cli_history_output as history_output
from consumer.admin_api_client import AdminApiClient
from consumer.config import Settings
from consumer.errors import ApiFailure, BadRequest, PerkamoError
from consumer.queries import (
    DEFAULT_LIMIT,
    STATUSES,
    DeliveryFilter,
    delivery_detail,
    iso,
    list_deliveries,
    parse_time,
)

# rich and clickhouse-connect are imported by the commands that use them, so that the
# parser (and `perkamo-webhooks health`, the container probe) starts light.

EXIT_FAILED: Final = 1
EXIT_INVALID: Final = 2
EXIT_REFUSED: Final = 3
_TIME_HELP = "ISO-8601 (2026-06-01T10:00:00Z; no zone = UTC) or a time ago: 30m, 24h, 7d"


def add_subcommands(sub: Any) -> None:
    """Register `history`, `resend` and `replay` on the `perkamo-webhooks` parser."""
    history = sub.add_parser(
        "history",
        help="list deliveries (newest first) or one delivery's attempts",
        description="Deliveries by their first attempt's time, with the status of their latest "
        "attempt. --delivery-id shows every attempt of one delivery (other filters ignored).",
    )
    history.add_argument("--space", default="", help="the Space's slug (with --delivery-id: "
                         "that Space's rows only)")
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
    resend.add_argument("--space", default="", help="the delivery's Space (needed only when its id "
                        "has rows in several Spaces)")
    resend.add_argument("--force", action="store_true",
                        help="resend even if it is still in the retry tiers or held (never one "
                        "re-published moments ago that history does not show yet)")
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
                return _direct_detail(settings, args.delivery_id, args.space)
            quoted = urllib.parse.quote(args.delivery_id, safe="")
            return AdminApiClient(settings).get(f"/deliveries/{quoted}", {"space": args.space})
        since = parse_time(args.since, name="--since") if args.since else None
        until = parse_time(args.until, name="--until") if args.until else None
        if direct:
            flt = DeliveryFilter(args.space, args.status or "", args.event_type, since, until)
            return _direct_list(settings, flt, args.limit, args.cursor)
        return AdminApiClient(settings).get("/deliveries", {
            "space": args.space, "status": args.status or "", "event_type": args.event_type,
            "since": iso(since) or "", "until": iso(until) or "", "limit": str(args.limit),
            "cursor": args.cursor or "",
        })

    doc = _call(fetch)
    if isinstance(doc, int):
        return doc
    if args.json:
        history_output.print_json(doc)
    elif args.delivery_id:
        history_output.print_detail(doc)
    else:
        history_output.print_list(doc)
    return 0


def _resend(args: argparse.Namespace, settings: Settings) -> int:
    client = AdminApiClient(settings)
    path = f"/deliveries/{urllib.parse.quote(args.delivery_id, safe='')}/resend"
    doc = _call(lambda: _one(client.post(path, {"force": args.force, "space": args.space})))
    if isinstance(doc, int):
        return doc
    if args.json:
        history_output.print_json(doc)
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
    client = AdminApiClient(settings)
    if args.dry_run:
        doc = _call(lambda: _one(client.post("/replay", body)))
        if isinstance(doc, int):
            return doc
        if args.json:
            history_output.print_json(doc)
        else:
            print(f"dry run, nothing published: {doc['eligible']} of {doc['matched']} matched "
                  f"deliveries of {args.space} first attempted in {window} would be replayed "
                  f"({_skipped(doc)}); replay id {doc['replay_id']}")
        return 0
    result = _call(lambda: _stream_replay(client, body))
    if isinstance(result, int):
        return result
    if args.json:
        history_output.print_json(result)
    elif not result["matched"]:
        print(f"nothing to replay: no delivery of {args.space} first attempted in {window} "
              + (f"has status {args.status}" if args.status else "exists"))
    else:
        print(f"replay {result['replay_id']}: {result['published']} of {result['matched']} matched "
              f"deliveries of {args.space} first attempted in {window} re-published "
              f"({_skipped(result)})")
    return 0


def _skipped(doc: dict[str, Any]) -> str:
    """What a replay left alone, in words."""
    return (f"{doc['skipped_in_retry']} still in the retry tiers are left to them, "
            f"{doc.get('skipped_on_the_way', 0)} re-published moments ago and on their way "
            "are skipped")


def _stream_replay(client: AdminApiClient, body: dict[str, Any]) -> dict[str, Any]:
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


def _direct_detail(settings: Settings, delivery_id: str, space: str = "") -> dict[str, Any]:
    store = _direct_store(settings)
    try:
        detail = delivery_detail(store, delivery_id, space=space)
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


