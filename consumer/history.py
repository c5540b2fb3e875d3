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

from consumer.config import Settings
from consumer.constants import ERROR_MAX, HISTORY_DATABASE, HISTORY_TABLE, STATUS_TEXT_MAX
from consumer.errors import HistoryUnavailable
from consumer.models import AttemptRow
from consumer.schemas import schema_path

log = logging.getLogger(__name__)

TABLE = f"{HISTORY_DATABASE}.{HISTORY_TABLE}"
COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(AttemptRow))
# attrgetter, not dataclasses.astuple: astuple deep-copies every field and halved insert speed.
_row_values = operator.attrgetter(*COLUMNS)
_COLUMN_RE = re.compile(r"^\s{4}([a-z_][a-z0-9_]*)\s+(.+?),?$")


def _ddl(ttl_days: int) -> str:
    return schema_path("clickhouse/webhook_attempts.sql").read_text().format(ttl_days=ttl_days)


_STATUS_TEXT_AT = COLUMNS.index("status_text")
_ERROR_AT = COLUMNS.index("error")


def client_kwargs(
    dsn: str, password: str = "", ca_bundle: str | None = None
) -> dict[str, Any]:
    """What clickhouse-connect's get_client() is given: the DSN (which may carry user and
    password), PERKAMO_HISTORY_PASSWORD and the CA for an https:// server. Never logged."""
    kwargs: dict[str, Any] = {"dsn": dsn}
    if dsn.startswith("chdb://"):
        return kwargs
    if password:
        kwargs["password"] = password
    if ca_bundle:
        kwargs["ca_cert"] = ca_bundle
        kwargs["verify"] = True
    return kwargs


def mask_dsn(dsn: str) -> str:
    """The DSN without its password, fit for a message."""
    scheme, sep, rest = dsn.partition("://")
    authority, slash, path = rest.partition("/")
    if sep and "@" in authority:
        user = authority.rpartition("@")[0].partition(":")[0]
        return f"{scheme}://{user}:********@{authority.rpartition('@')[2]}{slash}{path}"
    return dsn


class HistoryStore:
    """clickhouse-connect clients for the history table: one for writes, one for reads.

    chDB sessions are not for concurrent use, so each client has a lock; but the two are
    separate clients (clickhouse-connect gives each its own chdb connection handle to the
    one engine a process hosts, which chdb allows), so a slow read never delays an insert.
    Reads carry a server-side time limit (`max_execution_time`, PERKAMO_HISTORY_QUERY_TIMEOUT_S).
    """

    def __init__(
        self,
        dsn: str,
        *,
        password: str = "",
        ca_bundle: str | None = None,
        query_timeout_s: float | None = None,
    ) -> None:
        self.dsn = dsn
        self._lock = threading.Lock()  # the write client's
        self._read_lock = threading.Lock()
        self.query_timeout_s = query_timeout_s
        if dsn.startswith("chdb://"):
            Path(dsn.removeprefix("chdb://")).mkdir(parents=True, exist_ok=True)
        kwargs = client_kwargs(dsn, password, ca_bundle)
        try:
            self._client = clickhouse_connect.get_client(**kwargs)
            self._reader = clickhouse_connect.get_client(**kwargs)
        except Exception as exc:
            if isinstance(exc.__context__, SystemExit):
                # A SIGTERM during start-up stops the process cleanly (consumer.cli); the
                # embedded engine's import turns it into an ImportError: it is a stop, not a fault.
                raise exc.__context__ from None
            raise HistoryUnavailable(
                f"cannot open history store {mask_dsn(dsn)}: {type(exc).__name__}"
            ) from exc
        # Test hook for fault injection (tests/faults): called before each insert.
        self.before_insert: Callable[[], None] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> HistoryStore:
        """The store of PERKAMO_HISTORY_DSN with its password, CA and query time limit."""
        return cls(
            settings.history_dsn_resolved,
            password=settings.history_password_value,
            ca_bundle=str(settings.history_ca_bundle) if settings.history_ca_bundle else None,
            query_timeout_s=settings.history_query_timeout_s,
        )

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
        data = [_capped(_row_values(row)) for row in rows]
        with self._lock:
            self._client.insert(TABLE, data, column_names=COLUMNS)

    def query(
        self, sql: str, parameters: dict[str, Any] | None = None
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Run a read on the read client (never waits for an insert); returns (columns, rows).

        With a query time limit, the server stops the query after it (TIMEOUT_EXCEEDED)."""
        settings = {"max_execution_time": self.query_timeout_s} if self.query_timeout_s else None
        with self._read_lock:
            result = self._reader.query(sql, parameters=parameters or {}, settings=settings)
            return list(result.column_names), [tuple(r) for r in result.result_rows]

    def command(self, sql: str) -> Any:
        with self._lock:
            return self._client.command(sql)

    def close(self) -> None:
        with self._read_lock:
            self._reader.close()
        with self._lock:
            self._client.close()




def _capped(values: tuple[Any, ...]) -> tuple[Any, ...]:
    """A row's values with the status text and error capped (a receiver chooses the reason
    phrase; an error can quote it)."""
    status_text, error = values[_STATUS_TEXT_AT], values[_ERROR_AT]
    if len(status_text) <= STATUS_TEXT_MAX and len(error) <= ERROR_MAX:
        return values
    capped = list(values)
    capped[_STATUS_TEXT_AT] = status_text[:STATUS_TEXT_MAX]
    capped[_ERROR_AT] = error[:ERROR_MAX]
    return tuple(capped)


def _column_definitions(ddl: str) -> list[tuple[str, str]]:
    columns = []
    for line in ddl.splitlines():
        match = _COLUMN_RE.match(line)
        if match and not line.strip().startswith("INDEX"):
            columns.append((match.group(1), match.group(2).rstrip(",")))
    return columns
