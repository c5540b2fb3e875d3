"""consumer.logsetup: text or one JSON object per line."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import orjson
import pytest

from consumer.logsetup import JsonFormatter, configure


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    access_level = logging.getLogger("aiohttp.access").level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(access_level)


def json_lines(err: str) -> list[dict[str, object]]:
    lines = err.splitlines()
    assert lines, "nothing was logged"
    return [orjson.loads(line) for line in lines]


def test_json_format_one_object_per_line(
    restore_root_logger: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure("INFO", "json")
    logging.getLogger("consumer.test").info("delivered %s to %s", "dlv_1", "hooks.example")
    logging.getLogger("consumer.other").warning("two\nlines")
    logging.getLogger("consumer.test").debug("hidden at INFO")
    docs = json_lines(capsys.readouterr().err)
    assert len(docs) == 2
    first, second = docs
    assert first["level"] == "INFO"
    assert first["logger"] == "consumer.test"
    assert first["message"] == "delivered dlv_1 to hooks.example"
    assert isinstance(first["ts"], str)
    assert str(first["ts"]).endswith("+00:00")
    assert second == {
        **second,
        "level": "WARNING",
        "logger": "consumer.other",
        "message": "two\nlines",
    }


def test_json_format_includes_the_exception(
    restore_root_logger: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure("INFO", "json")
    try:
        raise ValueError("bad thing")
    except ValueError:
        logging.getLogger("consumer.test").exception("failed")
    (doc,) = json_lines(capsys.readouterr().err)
    assert doc["level"] == "ERROR"
    assert doc["message"] == "failed"
    assert "ValueError: bad thing" in str(doc["exception"])


def test_text_format(restore_root_logger: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure("WARNING", "text")
    logging.getLogger("consumer.test").info("hidden")
    logging.getLogger("consumer.test").warning("shown %d", 7)
    err = capsys.readouterr().err
    assert "hidden" not in err
    assert "WARNING consumer.test: shown 7" in err


def test_configure_replaces_handlers_and_quiets_access_log(restore_root_logger: None) -> None:
    configure("DEBUG", "json")
    configure("DEBUG", "json")
    root = logging.getLogger()
    assert len(root.handlers) == 1
    assert isinstance(root.handlers[0].formatter, JsonFormatter)
    assert root.level == logging.DEBUG
    assert logging.getLogger("aiohttp.access").level == logging.WARNING


def test_json_formatter_survives_surrogates() -> None:
    record = logging.LogRecord(
        "consumer.test", logging.WARNING, __file__, 1, "reason %s", ("bad\udcff",), None
    )
    doc = orjson.loads(JsonFormatter().format(record))
    assert doc["message"].startswith("reason bad")
