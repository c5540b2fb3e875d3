"""Why a history store call failed, in words fit for a log line (consumer.ingest).

`type(exc).__name__` alone says `DatabaseError` for a full disk, a dropped table and a server
that went away alike. The engine's own message says which ("Cannot reserve 1.00 MiB, not enough
space. (NOT_ENOUGH_SPACE)", "No space left on device"), so it is kept; but only the engine's
and the operating system's words: a client-side error can quote a row's values (customer
data), and a transport error names the server's URL, so those are cut to what they are.
"""

from __future__ import annotations

import re
from typing import Final

from clickhouse_connect.driver.exceptions import Error as ClickHouseDriverError

CAUSE_MAX: Final = 300
_ENGINE = re.compile(r"Code:\s*(\d+)\.\s*(?:DB::\w*Exception:\s*)?(.*)", re.S)
_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.I)
_VERSION = re.compile(r"\s*\(version [^)]*(?:\([^)]*\))?[^)]*\)\s*$")


def cause_of(exc: BaseException) -> str:
    """`DatabaseError: code 243: Cannot reserve 1.00 MiB, not enough space. (NOT_ENOUGH_SPACE)`,
    `OSError: No space left on device`, or the type alone when its text may hold row values."""
    name = type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        return f"{name}: {exc.strerror}"
    if not isinstance(exc, ClickHouseDriverError):
        return name
    text = str(exc)
    engine = _ENGINE.search(text)
    if engine:
        first_line = engine.group(2).strip().splitlines()[0] if engine.group(2).strip() else ""
        text = f"code {engine.group(1)}: {_VERSION.sub('', first_line)}"
    text = _URL.sub("<server>", " ".join(text.split()))
    if not text:
        return name
    return f"{name}: {text[:CAUSE_MAX]}" + ("…" if len(text) > CAUSE_MAX else "")
