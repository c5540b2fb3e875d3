"""Delivery history in ClickHouse: schema migration, the batching writer, and reads (DESIGN §8).

The same code serves the embedded engine (`chdb://path`, the real ClickHouse engine
in-process, one process at a time) and a ClickHouse server (`http(s)://…`).

Writes are batched (size and time bounded) in a thread of their own. `submit()` hands back a
future that resolves once the row's batch is in the store: the consumer commits an offset only
after that. When the store is slow or down the writer keeps every row and retries; its
`backlog` grows, and the consumer pauses intake past PERKAMO_HISTORY_MAX_BUFFERED_ROWS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import clickhouse_connect

from consumer.config import Settings
from consumer.constants import HISTORY_DATABASE, HISTORY_TABLE
from consumer.errors import HistoryUnavailable
from consumer.metrics import Metrics
from consumer.models import AttemptRow
from consumer.schemas import schema_path

log = logging.getLogger(__name__)

TABLE = f"{HISTORY_DATABASE}.{HISTORY_TABLE}"
COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(AttemptRow) if f.name != "extra")
# attrgetter, not dataclasses.astuple: astuple deep-copies every field and halved insert speed.
_row_values = operator.attrgetter(*COLUMNS)
_COLUMN_RE = re.compile(r"^\s{4}([a-z_]+)\s+(.+?),?$")


def _ddl(ttl_days: int) -> str:
    return schema_path("clickhouse/webhook_attempts.sql").read_text().format(ttl_days=ttl_days)


# Receiver-controlled text is capped where it enters history (DESIGN §4: bounded everything).
STATUS_TEXT_MAX = 256
ERROR_MAX = 1024
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

    @property
    def embedded(self) -> bool:
        return self.dsn.startswith("chdb://")

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

    def writable(self) -> bool:
        try:
            with self._lock:
                self._client.command("SELECT 1")
        except Exception:
            return False
        return True

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


class HistoryWriter:
    """Batches attempt rows into the store from a thread; futures say when a row is durable."""

    def __init__(
        self,
        store: HistoryStore,
        metrics: Metrics,
        batch_rows: int,
        flush_interval_s: float,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._batch_rows = batch_rows
        self._interval = flush_interval_s
        self._cond = threading.Condition()
        self._rows: list[AttemptRow] = []
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None], int]] = []
        self._accepted = 0  # rows submitted so far
        self._written = 0  # rows durably written so far
        self._first_at = 0.0
        self._stopping = False
        self.healthy = True
        self._thread = threading.Thread(target=self._run, name="history-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def backlog(self) -> int:
        """Rows accepted and not yet written."""
        return self._accepted - self._written

    def submit(self, row: AttemptRow) -> asyncio.Future[None]:
        """Queue a row; the future resolves when it is written (never fails: rows are kept)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._cond:
            if self._stopping:
                raise HistoryUnavailable("history writer is stopped")
            if not self._rows:
                self._first_at = time.monotonic()
            self._rows.append(row)
            self._accepted += 1
            self._waiters.append((loop, future, self._accepted))
            self._metrics.history_buffer_rows.set(self.backlog)
            if len(self._rows) >= self._batch_rows:
                self._cond.notify()
        return future

    def stop(self, timeout: float) -> bool:
        """Write what is queued, then stop the thread; False if rows are still unwritten."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)
        return self.backlog == 0

    def _run(self) -> None:
        backoff = 0.2
        while True:
            with self._cond:
                while not self._stopping and (
                    not self._rows
                    or (
                        len(self._rows) < self._batch_rows
                        and time.monotonic() - self._first_at < self._interval
                    )
                ):
                    wait = (
                        self._interval
                        if not self._rows
                        else self._interval - (time.monotonic() - self._first_at)
                    )
                    self._cond.wait(max(wait, 0.01))
                if not self._rows:
                    if self._stopping:
                        return
                    continue
                batch = self._rows[: self._batch_rows]
            started = time.perf_counter()
            try:
                self._store.insert(batch)
            except Exception as exc:
                self.healthy = False
                self._metrics.history_write_errors.inc()
                log.error(
                    "history write of %d rows failed (%s); keeping them, retrying in %.1fs",
                    len(batch),
                    type(exc).__name__,
                    backoff,
                )
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.2
            self.healthy = True
            self._metrics.history_flush_duration.observe(time.perf_counter() - started)
            self._metrics.history_rows_written.inc(len(batch))
            with self._cond:
                del self._rows[: len(batch)]
                self._first_at = time.monotonic()
                self._written += len(batch)
                written = self._written
                ready = [w for w in self._waiters if w[2] <= written]
                self._waiters = [w for w in self._waiters if w[2] > written]
                self._metrics.history_buffer_rows.set(self.backlog)
            _resolve(ready)


def _resolve(waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None], int]]) -> None:
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
    for loop, future, _ in waiters:
        by_loop.setdefault(loop, []).append(future)
    for loop, futures in by_loop.items():
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            loop.call_soon_threadsafe(_set_all, futures)


def _set_all(futures: list[asyncio.Future[None]]) -> None:
    for future in futures:
        if not future.done():
            future.set_result(None)


def row_dicts(columns: Sequence[str], rows: Sequence[tuple[Any, ...]]) -> list[dict[str, Any]]:
    return [dict(zip(columns, row, strict=True)) for row in rows]
