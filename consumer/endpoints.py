"""The endpoint registry: which endpoint each Space's events go to (DESIGN §5).

Two sources: the static `PERKAMO_ENDPOINTS_FILE` (a JSON list of endpoint records) and the
compacted topic `perkamo.webhooks.endpoints` (key = space slug, tombstone = removed). Per
Space the topic wins: a topic record overrides the file's record for that Space, and a
tombstone on the topic removes the topic's record (the file's record, if any, applies again).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import fastjsonschema
import orjson

from consumer.errors import InvalidEndpoint
from consumer.models import Endpoint, stable_id
from consumer.schemas import validator
from consumer.signing import decode_secret

log = logging.getLogger(__name__)

REASON_INVALID_JSON = "invalid_json"
REASON_SCHEMA = "schema"
REASON_KEY_MISMATCH = "key_mismatch"


def endpoint_id_for(space: str) -> str:
    """Default endpoint id: stable per Space, so a fixed URL keeps the delivery ids stable."""
    return stable_id("ep", space)


def parse_record(doc: Any) -> Endpoint:
    """Validate one endpoint record (schema + https + host present) and build an Endpoint."""
    try:
        validator("endpoint.schema.json")(doc)
    except fastjsonschema.JsonSchemaException as exc:
        name = getattr(exc, "name", "record")
        rule = getattr(exc, "rule", "schema")
        raise InvalidEndpoint(f"{name} violates {rule}") from None
    try:
        parts = urlsplit(doc["url"])
        port = parts.port
    except ValueError:
        raise InvalidEndpoint("url is malformed (host or port)") from None
    if port == 0:
        raise InvalidEndpoint("url port must be 1-65535")
    if parts.scheme != "https" or not parts.hostname:
        raise InvalidEndpoint("url must be an https:// URL with a host")
    if parts.username or parts.password:
        raise InvalidEndpoint("url must not carry credentials")
    for secret in doc.get("signing_secrets", ()):
        decode_secret(secret)  # a malformed secret is refused now, not at delivery time
    space = doc["space"]
    return Endpoint(
        id=doc.get("id") or endpoint_id_for(space),
        space=space,
        url=doc["url"],
        active=doc.get("active", True),
        signing_secrets=tuple(doc.get("signing_secrets", ())),
    )


def mask_url(url: str) -> str:
    """`scheme://host/…`: what may be shown of a URL (the path and query are secrets)."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}/…"


def record_of(endpoint: Endpoint) -> dict[str, Any]:
    """The JSON record for an Endpoint (what the CLI publishes to the registry topic)."""
    record: dict[str, Any] = {"space": endpoint.space, "url": endpoint.url, "active": endpoint.active}
    if endpoint.id != endpoint_id_for(endpoint.space):
        record["id"] = endpoint.id
    if endpoint.signing_secrets:
        record["signing_secrets"] = list(endpoint.signing_secrets)
    return record


def load_file(path: Path) -> list[Endpoint]:
    """Read PERKAMO_ENDPOINTS_FILE; any bad record stops start-up with its index named."""
    try:
        docs = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise InvalidEndpoint(f"PERKAMO_ENDPOINTS_FILE {path}: {exc}") from None
    if not isinstance(docs, list):
        raise InvalidEndpoint(f"PERKAMO_ENDPOINTS_FILE {path}: expected a JSON list of records")
    endpoints = []
    for index, doc in enumerate(docs):
        try:
            endpoints.append(parse_record(doc))
        except InvalidEndpoint as exc:
            raise InvalidEndpoint(f"PERKAMO_ENDPOINTS_FILE {path}: record {index}: {exc}") from None
    return endpoints


class EndpointRegistry:
    """Space slug -> active Endpoint, from the file and the registry topic; thread-safe."""

    def __init__(self, file_endpoints: Iterable[Endpoint] = ()) -> None:
        self._lock = threading.Lock()
        self._from_file = {ep.space: ep for ep in file_endpoints}
        self._from_topic: dict[str, Endpoint] = {}
        self.loaded = False  # set once the topic was read to its end (or there is no topic)

    def get(self, space: str) -> Endpoint | None:
        """The Space's endpoint if it exists and is active."""
        with self._lock:
            endpoint = self._from_topic.get(space) or self._from_file.get(space)
        if endpoint is None or not endpoint.active:
            return None
        return endpoint

    def apply(self, key: bytes | None, value: bytes | None) -> str | None:
        """Apply one registry-topic record; returns a reason label when it was invalid.

        The newest record per key is the truth, as compaction will leave only it: an invalid
        newest record removes the Space's topic record (its file record, if any, applies), so a
        running consumer and one started after compaction agree.
        """
        space = key.decode("utf-8", "replace") if key else ""
        if value is None:
            self._drop_topic_record(space)
            return None
        try:
            endpoint = parse_record(orjson.loads(value))
        except orjson.JSONDecodeError:
            reason = REASON_INVALID_JSON
        except InvalidEndpoint as exc:
            log.warning("endpoint record for space %r is invalid: %s", space, exc)
            reason = REASON_SCHEMA
        else:
            if not space or endpoint.space == space:
                with self._lock:
                    self._from_topic[endpoint.space] = endpoint
                return None
            reason = REASON_KEY_MISMATCH
        log.warning("endpoint record for space %r ignored (%s); its topic record is removed", space, reason)
        self._drop_topic_record(space)
        return reason

    def _drop_topic_record(self, space: str) -> None:
        with self._lock:
            self._from_topic.pop(space, None)

    def all(self) -> list[Endpoint]:
        """Every endpoint record in effect (active or not), one per Space."""
        with self._lock:
            merged = {**self._from_file, **self._from_topic}
        return sorted(merged.values(), key=lambda ep: ep.space)

    def active_count(self) -> int:
        return sum(1 for ep in self.all() if ep.active)
