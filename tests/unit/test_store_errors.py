"""A failed history insert logs why it failed (the engine's words), never row values or URLs."""

from __future__ import annotations

import logging

import pytest
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError
from confluent_kafka import TopicPartition

from consumer.config import load_settings
from consumer.ingest import HistoryIngest
from consumer.metrics import Metrics
from consumer.store_errors import CAUSE_MAX, cause_of

# What chDB raised on a full filesystem (a 3 MB tmpfs, this project's own measurement).
FULL_DISK = "Code: 243. DB::Exception: Cannot reserve 1.00 MiB, not enough space. (NOT_ENOUGH_SPACE)"


@pytest.mark.parametrize(
    ("exc", "said"),
    [
        (DatabaseError(FULL_DISK), "DatabaseError: code 243: Cannot reserve 1.00 MiB, not enough space. "
                                   "(NOT_ENOUGH_SPACE)"),
        (DatabaseError(
            "HTTPDriver for https://u:pw@ch.internal:8443/?x=1 received ClickHouse error code 243\n"
            "Code: 243. DB::ErrnoException: Cannot write to file /var/lib/clickhouse/tmp, errno: 28, "
            "strerror: No space left on device. (CANNOT_WRITE_TO_FILE_DESCRIPTOR) (version 24.8.1.1)"),
         "DatabaseError: code 243: Cannot write to file /var/lib/clickhouse/tmp, errno: 28, "
         "strerror: No space left on device. (CANNOT_WRITE_TO_FILE_DESCRIPTOR)"),
        (OperationalError("Error HTTPConnectionPool: http://u:secret@ch.internal:8123/ refused"),
         "OperationalError: Error HTTPConnectionPool: <server> refused"),
        (OSError(28, "No space left on device"), "OSError: No space left on device"),
        (ValueError("invalid literal for int() with base 10: 'customer secret'"), "ValueError"),
    ],
    ids=["engine", "server-with-url", "transport", "os", "client-side"],
)
def test_the_cause_is_the_engines_words_without_urls_or_values(exc: BaseException, said: str) -> None:
    assert cause_of(exc) == said


def test_a_long_cause_is_capped() -> None:
    said = cause_of(DatabaseError("Code: 1. DB::Exception: " + "x" * 5000))
    assert len(said) <= len("DatabaseError: code 1: ") + CAUSE_MAX + 1 and said.endswith("…")


class _Consumer:
    """What HistoryIngest's retry loop asks of its consumer while the store fails."""

    def pause(self, partitions: list[TopicPartition]) -> None: ...
    def resume(self, partitions: list[TopicPartition]) -> None: ...
    def consume(self, num_messages: int, timeout: float) -> list[object]:
        return []


def test_a_failed_insert_logs_its_cause(caplog: pytest.LogCaptureFixture) -> None:
    def full_disk(rows: object) -> None:
        raise DatabaseError(FULL_DISK)

    ingest = HistoryIngest(load_settings(), full_disk, Metrics())
    ingest._rows = [object()]  # type: ignore[list-item]  # the insert never looks at them
    with caplog.at_level(logging.ERROR, logger="consumer.ingest"):
        assert not ingest._insert_retrying(_Consumer(), give_up=0.0)  # type: ignore[arg-type]
    assert "not enough space. (NOT_ENOUGH_SPACE)" in caplog.text
    assert not ingest.healthy
