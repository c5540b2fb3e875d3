"""Log set-up: plain text or one JSON object per line (PERKAMO_LOG_FORMAT)."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime

import orjson


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and the exception, if any)."""

    def __init__(self, tag: str = "") -> None:
        super().__init__()
        self._tag = tag

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self._tag:
            doc["role"] = self._tag
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        try:
            return orjson.dumps(doc).decode()
        except TypeError:  # a lone surrogate in the text: keep the line, replace the bad characters
            clean = {k: v.encode("utf-8", "replace").decode() for k, v in doc.items()}
            return orjson.dumps(clean).decode()


def configure(level: str = "INFO", fmt: str = "text", tag: str = "") -> None:
    """`tag` names the process's role (deliver-0, history) when several share one log."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(tag))
    else:
        where = f" [{tag}]" if tag else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s{where} %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's access log would print request paths of the admin API on every scrape.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
