"""A small blocking HTTP client of the running consumer's admin API (`/api/v1`).

The CLI's `history`, `resend`, `replay` and `endpoints list` call it; stdlib only, since one
command makes a few requests and there is nothing to pool. An error status becomes ApiFailure,
an unreachable consumer a PerkamoError that says what to start or set.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any, Final

import orjson

from consumer.config import Settings
from consumer.errors import ApiFailure, PerkamoError

API: Final = "/api/v1"
_TIMEOUT_S: Final = 120.0
_BUSY_RETRIES: Final = 3


class AdminApiClient:
    """A small blocking client of the consumer's admin API (stdlib only: nothing to pool)."""

    def __init__(self, settings: Settings, timeout: float = _TIMEOUT_S) -> None:
        host, port = settings.admin_host_port
        if host in ("0.0.0.0", "::", ""):  # noqa: S104 - a wildcard bind is reached on loopback
            host = "127.0.0.1"
        self.base = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        self.token = settings.admin_token.get_secret_value()
        self.read_token = settings.admin_read_token.get_secret_value() or self.token
        self.dsn = settings.history_dsn_resolved
        self.timeout = timeout

    def get(self, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
        query = urllib.parse.urlencode({k: v for k, v in (params or {}).items() if v})
        url = f"{self.base}{API}{path}" + (f"?{query}" if query else "")
        headers = {"Authorization": f"Bearer {self.read_token}"} if self.read_token else {}
        for attempt in range(_BUSY_RETRIES + 1):
            try:
                request = urllib.request.Request(url, headers=headers)  # noqa: S310 - admin API
                with self._open(request) as response:
                    return dict(orjson.loads(response.read()))
            except ApiFailure as exc:  # 429: the consumer's history queries are all busy
                if exc.status != 429 or attempt == _BUSY_RETRIES:
                    raise
                time.sleep(1.0 + attempt)
        raise AssertionError("unreachable")

    def post(
        self, path: str, body: dict[str, Any], stream: bool = False
    ) -> Iterator[dict[str, Any]]:
        """POST JSON; yields the answer, or each NDJSON line of a streamed answer."""
        headers = {"Content-Type": "application/json"}
        if stream:
            headers["Accept"] = "application/x-ndjson"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(  # noqa: S310 - http to the admin API
            f"{self.base}{API}{path}", data=orjson.dumps(body), headers=headers, method="POST"
        )
        with self._open(request) as response:
            if "ndjson" not in response.headers.get("Content-Type", ""):
                yield dict(orjson.loads(response.read()))
                return
            for line in response:
                if line.strip():
                    yield dict(orjson.loads(line))

    def _open(self, request: urllib.request.Request) -> Any:
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)  # noqa: S310
        except urllib.error.HTTPError as exc:
            try:
                doc = orjson.loads(exc.read())
            except orjson.JSONDecodeError:
                doc = {}
            raise ApiFailure(exc.code, doc if isinstance(doc, dict) else {}) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            where = f"the running consumer's admin API at {self.base} ({reason})"
            if self.dsn.startswith("chdb://"):
                raise PerkamoError(
                    f"cannot reach {where}. The history is in the embedded engine, which only the "
                    "running consumer can open: start `perkamo-webhooks run`, check "
                    "PERKAMO_ADMIN_LISTEN, or point PERKAMO_HISTORY_DSN at a ClickHouse server."
                ) from None
            raise PerkamoError(f"cannot reach {where}: is `perkamo-webhooks run` up?") from None
