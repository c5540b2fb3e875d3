"""The history store in ClickHouse: schema migration, batch inserts and reads.

The same code serves the embedded engine (`chdb://path`, the real ClickHouse engine
in-process, one process at a time) and a ClickHouse server (`http(s)://…`). Only the history
role opens it (consumer.ingest writes; consumer.queries and the admin API read).
"""

from __future__ import annotations

import logging
import operator
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import clickhouse_connect

from consumer.constants import HISTORY_DATABASE, HISTORY_TABLE
from consumer.errors import HistoryUnavailable
from consumer.models import AttemptRow
from consumer.schemas import schema_path

log = logging.getLogger(__name__)

TABLE = f"{HISTORY_DATABASE}.{HISTORY_TABLE}"
COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(AttemptRow))
# attrgetter, not dataclasses.astuple: astuple deep-copies every field and halved insert speed.
_row_values = operator.attrgetter(*COLUMNS)
_COLUMN_RE = re.compile(r"^\s{4}([a-z_]+)\s+(.+?),?$")


def _ddl(ttl_days: int) -> str:
    return schema_path("clickhouse/webhook_attempts.sql").read_text().format(ttl_days=ttl_days)


class HistoryStore:
    """A clickhouse-connect client with a lock: chDB sessions are not for concurrent use."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._lock = threading.Lock()
        if dsn.startswith("chdb://"):
            Path(dsn.removeprefix("chdb://")).mkdir(parents=True, exist_ok=True)
        try:
            self._client = clickhouse_connect.get_client(dsn=dsn)
        except Exception as exc:
            raise HistoryUnavailable(f"cannot open history store: {type(exc).__name__}") from exc
        # Test hook for fault injection (tests/faults): called before each insert.
        self.before_insert: Callable[[], None] | None = None

    def migrate(self, ttl_days: int) -> list[str]:
        """Create or upgrade the schema in place; safe to run again. Returns what it did."""
        ddl = _ddl(ttl_days)
        done = []
        with self._lock:
            self._client.command(f"CREATE DATABASE IF NOT EXISTS {HISTORY_DATABASE}")
            self._client.command(ddl)
            done.append(f"ensured {TABLE}")
            # An older table gains the columns and indexes added since it was created.
            existing = {
                row[0]
                for row in self._client.query(
                    "SELECT name FROM system.columns WHERE database = {d:String} AND table = {t:String}",
                    parameters={"d": HISTORY_DATABASE, "t": HISTORY_TABLE},
                ).result_rows
            }
            for name, definition in _column_definitions(ddl):
                if name not in existing:
                    self._client.command(f"ALTER TABLE {TABLE} ADD COLUMN IF NOT EXISTS {name} {definition}")
                    done.append(f"added column {name}")
            for line in ddl.splitlines():
                stripped = line.strip().rstrip(",")
                if stripped.startswith("INDEX "):
                    self._client.command(f"ALTER TABLE {TABLE} ADD INDEX IF NOT EXISTS {stripped[6:]}")
            engine = self._client.query(
                "SELECT engine_full FROM system.tables WHERE database = {d:String} AND name = {t:String}",
                parameters={"d": HISTORY_DATABASE, "t": HISTORY_TABLE},
            ).result_rows[0][0]
            if f"toIntervalDay({int(ttl_days)})" not in engine:
                # Only when it changed, and without rewriting every part now: merges apply it.
                self._client.command(
                    f"ALTER TABLE {TABLE} MODIFY TTL toDateTime(attempted_at) + "
                    f"INTERVAL {int(ttl_days)} DAY SETTINGS materialize_ttl_after_modify = 0"
                )
                done.append(f"TTL set to {int(ttl_days)} days")
        return done

    def insert(self, rows: Sequence[AttemptRow]) -> None:
        if self.before_insert is not None:
            self.before_insert()
        data = [_row_values(row) for row in rows]
        with self._lock:
            self._client.insert(TABLE, data, column_names=COLUMNS)

    def query(
        self, sql: str, parameters: dict[str, Any] | None = None
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Run a read; returns (column names, rows)."""
        with self._lock:
            result = self._client.query(sql, parameters=parameters or {})
            return list(result.column_names), [tuple(r) for r in result.result_rows]

    def command(self, sql: str) -> Any:
        with self._lock:
            return self._client.command(sql)

    def close(self) -> None:
        with self._lock:
            self._client.close()


def _column_definitions(ddl: str) -> list[tuple[str, str]]:
    columns = []
    for line in ddl.splitlines():
        match = _COLUMN_RE.match(line)
        if match and not line.strip().startswith("INDEX"):
            columns.append((match.group(1), match.group(2).rstrip(",")))
    return columns
