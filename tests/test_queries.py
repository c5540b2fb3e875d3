"""The analysts' SQL (consumer.sql.README_QUERIES, docs/analysts.md) on seeded history,
duplicates included, and `migrate` upgrading an older table in place."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from consumer import constants as c
from consumer.models import AttemptRow
from consumer.queries import DeliveryFilter, list_deliveries
from consumer.sql import README_QUERIES
from tests.support import unique

REPO = Path(__file__).resolve().parent.parent
NOW = datetime.now(UTC).replace(microsecond=0)
WINDOW = {"since": NOW - timedelta(days=1), "until": NOW + timedelta(hours=1)}


def attempt(delivery_id: str, number: int, space: str, status: str, at: datetime,
            **fields: object) -> AttemptRow:
    """An attempt row like the Kafka loop writes; `fields` override any column."""
    row = AttemptRow(
        delivery_id=delivery_id, attempt=number, event_id=f"evt_{delivery_id}",
        event_type="purchase.completed", space_slug=space, environment="live",
        endpoint_id="ep_test", endpoint_host="hooks.example.com", user_id="customer_1",
        transaction_id="order_1",
        trigger=c.TRIGGER_INITIAL if number == 1 else c.TRIGGER_RETRY,
        status=status, status_code=204 if status == c.STATUS_DELIVERED else 500,
        status_text="", duration_ms=25, error="" if status == c.STATUS_DELIVERED else "HTTP 500",
        attempted_at=at, next_attempt_at=None, request_body=b'{"id":"evt"}', response_excerpt="",
        source_topic="perkamo.events", source_partition=0, source_offset=number,
        error_kind="" if status == c.STATUS_DELIVERED else "http_status",
    )
    return replace(row, **fields)  # type: ignore[arg-type]


def run(store, name: str, **params: object) -> list[tuple]:
    return store.query(README_QUERIES[name], params)[1]


def test_every_readme_query_is_in_the_analysts_doc_word_for_word():
    doc = (REPO / "docs" / "analysts.md").read_text()
    for name, sql in README_QUERIES.items():
        assert sql.strip() in doc, f"{name} differs from its text in docs/analysts.md"


def test_every_query_reads_with_final():
    from consumer import sql as module

    sqls = [v for k, v in vars(module).items() if k.isupper() and isinstance(v, str) and "SELECT" in v]
    assert len(sqls) >= 10
    for sql in sqls:  # or says why duplicates cannot change its answer
        assert "webhook_attempts FINAL" in sql or "-- No FINAL needed" in sql, sql


def test_failure_rate_per_space_per_hour(store):
    space = unique("rate")
    hour = (NOW - timedelta(hours=5)).replace(minute=0, second=0)
    first = [
        attempt("d1", 1, space, "delivered", hour + timedelta(minutes=1)),
        attempt("d2", 1, space, "delivered", hour + timedelta(minutes=2)),
        attempt("d3", 1, space, "delivered", hour + timedelta(minutes=3)),
        attempt("d4", 1, space, "retrying", hour + timedelta(minutes=4)),
    ]
    second = [
        attempt("d4", 2, space, "failed", hour + timedelta(minutes=64)),
        attempt("d5", 1, space, "retrying", hour + timedelta(minutes=65), error_kind="timeout"),
    ]
    store.insert(first + second)
    store.insert([first[0], first[3], second[0]])  # the same attempts again (a redelivery)

    rows = run(store, "failure_rate_per_space_per_hour", space=space, **WINDOW)
    assert [(r[0], r[1], r[2], r[3], r[4]) for r in rows] == [
        (space, hour.replace(tzinfo=None), 4, 1, 0.25),
        (space, (hour + timedelta(hours=1)).replace(tzinfo=None), 2, 2, 1.0),
    ]


def test_p95_duration_per_space(store):
    space = unique("p95")
    at = NOW - timedelta(hours=1)
    rows = [attempt(f"d{n}", 1, space, "delivered", at, duration_ms=10 * n) for n in range(1, 41)]
    circuit = attempt("dc", 1, space, "retrying", at, duration_ms=0, error_kind="circuit_open")
    store.insert([*rows, circuit])
    store.insert(rows[-3:])  # duplicates of the slowest three would move p95 if counted

    result = run(store, "p95_duration_per_space", space=space, **WINDOW)
    # 40 attempts of 10..400 ms; the circuit-open one made no HTTP call and is left out.
    assert result == [(space, 40, 390, 400)]


def test_stuck_in_retrying(store):
    # Its own "now": the module's now is from import time, and a slow suite run can reach this
    # test more than 15 minutes later, when "5 minutes ahead" is already "stuck".
    now = datetime.now(UTC).replace(microsecond=0)
    space = unique("stuck")
    old = now - timedelta(hours=3)
    stuck = attempt("stuck1", 2, space, "retrying", old, next_attempt_at=now - timedelta(hours=1),
                    error_kind="timeout")
    waiting = attempt("waiting", 1, space, "retrying", now, next_attempt_at=now + timedelta(minutes=5))
    recovered = [
        attempt("recovered", 1, space, "retrying", old, next_attempt_at=old + timedelta(seconds=10)),
        attempt("recovered", 2, space, "delivered", old + timedelta(seconds=11)),
    ]
    late = attempt("stuck2", 1, space, "retrying", old, next_attempt_at=now - timedelta(minutes=20))
    store.insert([attempt("stuck1", 1, space, "retrying", old - timedelta(minutes=1),
                          next_attempt_at=old), stuck, waiting, *recovered, late])
    store.insert([stuck, late])

    result = run(store, "stuck_in_retrying", space=space, stuck_minutes=15)
    assert [(r[0], r[2], r[3], r[5]) for r in result] == [
        ("stuck1", 2, "retrying", "timeout"),
        ("stuck2", 1, "retrying", "http_status"),
    ]


def test_top_error_kinds(store):
    space = unique("errors")
    at = NOW - timedelta(hours=2)
    rows = [
        attempt("a", 1, space, "retrying", at, error_kind="timeout"),
        attempt("a", 2, space, "retrying", at, error_kind="timeout"),
        attempt("b", 1, space, "retrying", at, error_kind="timeout"),
        attempt("b", 2, space, "delivered", at),
        attempt("c", 1, space, "retrying", at, error_kind="http_status"),
        attempt("c", 2, space, "failed", at, error_kind="http_status"),
        attempt("d", 1, space, "failed", at, error_kind="connect_error"),
    ]
    store.insert(rows)
    store.insert(rows[:2] + rows[4:5])

    assert run(store, "top_error_kinds", space=space, **WINDOW) == [
        ("timeout", 3, 2, 1),
        ("http_status", 2, 1, 1),
        ("connect_error", 1, 1, 1),
    ]


def test_delivery_history_takes_the_latest_copy_of_each_attempt(store):
    space = unique("one")
    delivery = unique("dlv")
    at = NOW - timedelta(minutes=30)
    store.insert([
        attempt(delivery, 1, space, "retrying", at, error_kind="timeout"),
        attempt(delivery, 2, space, "retrying", at + timedelta(seconds=10)),
        attempt(delivery, 3, space, "delivered", at + timedelta(seconds=70), trigger="resend",
                replay_id="rsn_x"),
    ])
    # Attempt 2 written again after a crash, with what the retried call answered that time.
    store.insert([attempt(delivery, 2, space, "failed", at + timedelta(seconds=12))])

    rows = run(store, "delivery_history", delivery_id=delivery)
    assert [(r[0], r[1], r[2], r[6]) for r in rows] == [
        (1, "initial", "retrying", "timeout"),
        (2, "retry", "failed", "http_status"),
        (3, "resend", "delivered", ""),
    ]
    assert rows[2][19] == "rsn_x"


def test_replay_outcomes(store):
    space = unique("replays")
    at = NOW - timedelta(minutes=10)
    rows = [
        attempt("r1", 3, space, "delivered", at, trigger="replay", replay_id="rpl_one"),
        attempt("r2", 3, space, "failed", at, trigger="replay", replay_id="rpl_one"),
        attempt("r3", 2, space, "delivered", at, trigger="replay", replay_id="rpl_one"),
        attempt("r4", 1, space, "delivered", at),
    ]
    store.insert(rows)
    store.insert(rows[:2])
    assert [r[:4] for r in run(store, "replay_outcomes", space=space, since=WINDOW["since"])] == [
        ("rpl_one", 3, 2, 1),
    ]


def test_delivery_list_counts_each_attempt_once(store):
    space = unique("list")
    at = NOW - timedelta(hours=1)
    rows = [attempt("x", 1, space, "retrying", at),
            attempt("x", 2, space, "failed", at + timedelta(seconds=5))]
    store.insert(rows)
    store.insert(rows)
    page = list_deliveries(store, DeliveryFilter(space=space))
    assert [(d["delivery_id"], d["status"], d["attempts"], d["last_attempt"]) for d in page.deliveries] == [
        ("x", "failed", 2, 2),
    ]


# migrate -------------------------------------------------------------------------------

# The table as the first release created it: no error_kind, no replay_id, no status index.
OLD_DDL = """
CREATE TABLE perkamo.webhook_attempts
(
    delivery_id String, attempt UInt16, event_id String, event_type LowCardinality(String),
    space_slug LowCardinality(String), environment LowCardinality(String), endpoint_id String,
    endpoint_host String, user_id String, transaction_id String, trigger LowCardinality(String),
    status LowCardinality(String), status_code UInt16, status_text String, duration_ms UInt32,
    error String, attempted_at DateTime64(3, 'UTC'), next_attempt_at Nullable(DateTime64(3, 'UTC')),
    request_body String CODEC(ZSTD(3)), response_excerpt String CODEC(ZSTD(3)),
    source_topic LowCardinality(String), source_partition Int32, source_offset Int64,
    written_at DateTime64(3, 'UTC') DEFAULT now64(3),
    INDEX idx_delivery_id delivery_id TYPE bloom_filter(0.01) GRANULARITY 4
)
ENGINE = ReplacingMergeTree(written_at)
PARTITION BY toYYYYMM(attempted_at)
ORDER BY (space_slug, delivery_id, attempt)
"""

# Rows of the last days: migrate applies the TTL, which drops rows older than 90 days.
# Runs in a process of its own: chDB opens one path per process, and this test process
# already holds the session's history path.
OLD_TABLE_SCRIPT = """
import sys
import clickhouse_connect
client = clickhouse_connect.get_client(dsn="chdb://" + sys.argv[1])
client.command("CREATE DATABASE perkamo")
client.command(sys.argv[2])
client.command(
    "INSERT INTO perkamo.webhook_attempts (delivery_id, attempt, event_id, space_slug, status, "
    "attempted_at, request_body) VALUES ('dlv_old', 1, 'evt_old', 'legacy', 'delivered', "
    "now64(3) - INTERVAL 2 DAY, '{\\"id\\":\\"evt_old\\"}'), ('dlv_old', 2, 'evt_old', 'legacy', "
    "'failed', now64(3) - INTERVAL 1 DAY, '')"
)
"""

INSPECT_SCRIPT = """
import json, sys
import clickhouse_connect
client = clickhouse_connect.get_client(dsn="chdb://" + sys.argv[1])
columns = client.query(
    "SELECT name, type FROM system.columns WHERE database = 'perkamo' AND table = 'webhook_attempts'"
).result_rows
indexes = client.query(
    "SELECT name FROM system.data_skipping_indices WHERE database = 'perkamo' AND table = 'webhook_attempts'"
).result_rows
wanted = ["delivery_id", "attempt", "status", "request_body", "error_kind", "replay_id", "trace_id",
          "dns_ms", "ttfb_ms", "connection_reused", "cert_not_after"]
present = [name for name in wanted if name in dict(columns)]
rows = client.query(
    f"SELECT {', '.join(present)} FROM perkamo.webhook_attempts FINAL ORDER BY attempt"
).result_rows
print(json.dumps({"columns": dict(columns), "indexes": [i[0] for i in indexes],
                  "rows": [list(r) for r in rows]}))
"""


def _python(script: str, *args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args],
                          check=False, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.timeout(300)
def test_migrate_upgrades_an_older_table_in_place(tmp_path):
    import json

    path = tmp_path / "old-history"
    _python(OLD_TABLE_SCRIPT, str(path), OLD_DDL)
    before = json.loads(_python(INSPECT_SCRIPT, str(path)))
    assert "error_kind" not in before["columns"] and "replay_id" not in before["columns"]
    assert len(before["rows"]) == 2

    env = {**os.environ, "PERKAMO_HISTORY_DSN": f"chdb://{path}", "PERKAMO_DATA_DIR": str(tmp_path)}
    env.pop("PERKAMO_SETTINGS_FILE", None)
    cli = [sys.executable, "-m", "consumer", "migrate"]
    first = subprocess.run(cli, check=False, capture_output=True, text=True, timeout=120, env=env,
                           cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "added column error_kind" in first.stdout
    assert "added column replay_id" in first.stdout
    for column in ("trace_id", "span_id", "dns_ms", "connect_ms", "tls_ms", "ttfb_ms", "connection_reused",
                   "cert_not_after"):  # issue 17: tracing, network timings, certificate expiry
        assert f"added column {column}" in first.stdout
    again = subprocess.run(cli, check=False, capture_output=True, text=True, timeout=120, env=env,
                           cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "added column" not in again.stdout  # re-runnable: nothing left to add

    after = json.loads(_python(INSPECT_SCRIPT, str(path)))
    assert after["columns"]["error_kind"] == "LowCardinality(String)"
    assert after["columns"]["replay_id"] == "String"
    assert after["columns"]["dns_ms"] == "Nullable(UInt32)"
    assert after["columns"]["connection_reused"] == "Nullable(Bool)"
    assert {"idx_delivery_id", "idx_attempted_at", "idx_status", "idx_trace_id"} <= set(after["indexes"])
    # Old rows: no trace id, timings not measured (NULL, not 0: a kept-alive connection's 0 means skipped)
    assert after["rows"] == [
        ["dlv_old", 1, "delivered", '{"id":"evt_old"}', "", "", "", None, None, None, None],
        ["dlv_old", 2, "failed", "", "", "", "", None, None, None, None],
    ]
