"""How the CLI prints delivery history: JSON, or Rich tables for a person.

Text that comes from history or a receiver (errors, status text, ids) is printed as plain
text, never read as Rich markup, so a response cannot put links or styles in a support
terminal. rich is imported by the functions that use it, so the parser starts light.
"""

from __future__ import annotations

import sys
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

import orjson

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

_STATUS_STYLE = {"delivered": "green", "retrying": "yellow", "failed": "red"}


def print_json(doc: Any) -> None:
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


def console() -> Console:
    from rich.console import Console

    # No markup, no highlighting, no emoji codes: the text shown comes from receivers.
    return Console(markup=False, highlight=False, emoji=False)


def print_list(doc: dict[str, Any]) -> None:
    from rich.table import Table

    out = console()
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
    out.print(table)
    if not doc["deliveries"]:
        out.print("no deliveries match")
    if doc.get("next_cursor"):
        out.print(f"more: add --cursor {doc['next_cursor']}", soft_wrap=True)


def print_detail(doc: dict[str, Any]) -> None:
    from rich.table import Table
    from rich.text import Text

    out = console()
    out.print(Text.assemble(
        "delivery ", (str(doc["delivery_id"]), "bold"), f"  space {doc['space']}  ",
        f"event {doc['event_id']} ({doc['event_type']})  status ", _status(doc["status"]),
    ), soft_wrap=True)
    traces = sorted({str(a.get("trace_id") or "") for a in doc["attempts"]} - {""})
    if traces:
        out.print(f"trace {', '.join(traces)}", soft_wrap=True)
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
    out.print(table)
    cut = body_cut(doc["attempts"])
    if cut:
        out.print(cut, soft_wrap=True)


def body_cut(attempts: list[dict[str, Any]]) -> str:
    """A sentence when history keeps only the first bytes of the delivery's body ('' if whole)."""
    a = next((a for a in attempts if a.get("request_body_truncated")), None)
    if a is None:
        return ""
    whole = int(a.get("request_body_bytes") or 0)
    if "request_body" in a:  # read with the payload
        kept = f"{len(str(a['request_body']).encode()):,} of {whole:,} bytes kept"
    else:
        kept = f"the first bytes of {whole:,} kept"
    return (f"body cut: {kept}, sha256 {a.get('request_body_sha256')} (the receiver got the whole "
            f"body; a resend reads it back from {a['source_topic']}[{a['source_partition']}]"
            f"@{a['source_offset']})")
