"""The endpoint registry: which endpoint each Space's events go to (docs/architecture.md, endpoints).

Two sources: the static `PERKAMO_ENDPOINTS_FILE` (a JSON list of endpoint records) and the
compacted topic `perkamo.webhooks.endpoints` (key = space slug, tombstone = removed). Per
Space the topic wins: a topic record overrides the file's record for that Space, and a
tombstone on the topic removes the topic's record (the file's record, if any, applies again).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import fastjsonschema
import orjson

from consumer.addresses import host_problem
from consumer.errors import BadEndpointsFile, InvalidEndpoint
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


_FIELDS: Final = ("space", "url", "active", "id", "signing_secrets")
_SLUG_RE: Final = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_ID_RE: Final = re.compile(r"^ep_[A-Za-z0-9_-]{1,64}$")
_URL_MAX: Final = 2048
_MAX_SECRETS: Final = 4
RECORD_EXAMPLE: Final = '{"space": "<slug>", "url": "https://…", "active": true}'
# What each field's schema rule means, for the rare failure the checks below do not name.
_SCHEMA_SENTENCES: Final = {
    "space": "space must be a Space slug: lower-case letters, digits and hyphens, at most 63",
    "url": "url must be https://host[:port] with an optional /path, without spaces or @",
    "active": "active must be true or false",
    "id": "id must be ep_ followed by 1-64 letters, digits, _ or -",
    "signing_secrets": "signing_secrets must be a list of at most 4 whsec_… secrets",
}


def _check_url(url: Any) -> None:
    """The url field's rules, each refusal a sentence naming the field and the rule."""
    if not isinstance(url, str):
        raise InvalidEndpoint("url must be a string")
    if len(url) > _URL_MAX:
        raise InvalidEndpoint(f"url must be at most {_URL_MAX} characters")
    if not url.startswith("https://"):
        scheme = url.partition("://")[0].lower() if "://" in url else ""
        got = f" (it is {scheme}:)" if scheme.isascii() and scheme.isalnum() else ""
        raise InvalidEndpoint(f"url must be an https:// URL{got}; plain http and other schemes "
                              "are refused")
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        raise InvalidEndpoint("url must not contain spaces or control characters")
    authority = url[len("https://"):].split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    if "@" in authority:
        raise InvalidEndpoint("url must not carry credentials (user:password@); sign deliveries "
                              "with signing_secrets instead")
    try:
        port = urlsplit(url).port
    except ValueError:
        port = 0
    if port == 0:
        raise InvalidEndpoint("url port must be a number from 1 to 65535")
    problem = host_problem(url)
    if problem is not None:
        raise InvalidEndpoint(problem)


def _check_fields(doc: Any) -> None:
    """Every rule of schemas/endpoint.schema.json, as sentences (`url must be an https:// URL`)."""
    if not isinstance(doc, dict):
        raise InvalidEndpoint(f"an endpoint record must be a JSON object like {RECORD_EXAMPLE}")
    unknown = sorted(str(k) for k in doc if k not in _FIELDS)
    if unknown:
        raise InvalidEndpoint(f"unknown field {unknown[0][:64]!r}; an endpoint record has "
                              f"{', '.join(_FIELDS)}")
    for required in ("space", "url"):
        if required not in doc:
            raise InvalidEndpoint(f"{required} is required, e.g. {RECORD_EXAMPLE}")
    space = doc["space"]
    if not isinstance(space, str) or not _SLUG_RE.match(space):
        raise InvalidEndpoint("space must be a Space slug: lower-case letters, digits and "
                              "hyphens, starting with a letter or digit, at most 63 characters")
    _check_url(doc["url"])
    if "active" in doc and not isinstance(doc["active"], bool):
        raise InvalidEndpoint("active must be true or false")
    if "id" in doc and (not isinstance(doc["id"], str) or not _ID_RE.match(doc["id"])):
        raise InvalidEndpoint(_SCHEMA_SENTENCES["id"])
    secrets = doc.get("signing_secrets", [])
    if not isinstance(secrets, list) or len(secrets) > _MAX_SECRETS:
        raise InvalidEndpoint(_SCHEMA_SENTENCES["signing_secrets"])
    for index, secret in enumerate(secrets):
        if not isinstance(secret, str):
            raise InvalidEndpoint(f"signing_secrets[{index}] must be a string whsec_…")
        try:
            decode_secret(secret)  # a malformed secret is refused now, not at delivery time
        except InvalidEndpoint as exc:
            raise InvalidEndpoint(f"signing_secrets[{index}]: {exc}") from None


def parse_record(doc: Any) -> Endpoint:
    """Validate one endpoint record and build an Endpoint; InvalidEndpoint says, in a sentence,
    which field breaks which rule (`url must be an https:// URL`).

    The host must be plain ASCII as written (IDNA names in their xn-- form): what the record
    says is then exactly what aiohttp dials, and the SSRF guard judges that."""
    _check_fields(doc)
    try:
        validator("endpoint.schema.json")(doc)  # the schema stays the final word
    except fastjsonschema.JsonSchemaException as exc:
        name = str(getattr(exc, "name", "") or "").removeprefix("data.").split(".")[0].split("[")[0]
        fallback = f"the record breaks schemas/endpoint.schema.json ({name or 'record'})"
        raise InvalidEndpoint(_SCHEMA_SENTENCES.get(name, fallback)) from None
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
        raise BadEndpointsFile(f"PERKAMO_ENDPOINTS_FILE {path}: {exc}") from None
    if not isinstance(docs, list):
        raise BadEndpointsFile(f"PERKAMO_ENDPOINTS_FILE {path}: expected a JSON list of records")
    endpoints = []
    for index, doc in enumerate(docs):
        try:
            endpoints.append(parse_record(doc))
        except InvalidEndpoint as exc:
            raise BadEndpointsFile(f"PERKAMO_ENDPOINTS_FILE {path}: record {index}: {exc}") from None
    return endpoints


# (space, endpoint in effect before, endpoint in effect after); either may be None.
EndpointListener = Callable[[str, "Endpoint | None", "Endpoint | None"], None]


class EndpointRegistry:
    """Space slug -> active Endpoint, from the file and the registry topic; thread-safe.

    Listeners (`add_listener`) hear of every change of the endpoint in effect for a Space, on
    the thread that applied it (the registry follower's): that is where per-endpoint state of
    an endpoint that went away is dropped (docs/architecture.md, endpoints: bounded by construction)."""

    def __init__(self, file_endpoints: Iterable[Endpoint] = ()) -> None:
        self._lock = threading.Lock()
        self._from_file = {ep.space: ep for ep in file_endpoints}
        self._from_topic: dict[str, Endpoint] = {}
        self._listeners: list[EndpointListener] = []
        self.loaded = False  # set once the topic was read to its end (or there is no topic)

    def add_listener(self, listener: EndpointListener) -> None:
        """Call `listener(space, before, after)` after each change of a Space's endpoint."""
        self._listeners.append(listener)

    def spaces(self) -> set[str]:
        """Every Space with an endpoint record in effect (active or not)."""
        with self._lock:
            return set(self._from_file) | set(self._from_topic)

    def _in_effect(self, space: str) -> Endpoint | None:
        return self._from_topic.get(space) or self._from_file.get(space)

    def _set_topic_record(self, space: str, endpoint: Endpoint | None) -> None:
        with self._lock:
            before = self._in_effect(space)
            if endpoint is None:
                self._from_topic.pop(space, None)
            else:
                self._from_topic[space] = endpoint
            after = self._in_effect(space)
        if before != after:
            for listener in self._listeners:
                try:
                    listener(space, before, after)
                except Exception:  # a listener's bug must not stop the registry
                    log.exception("endpoint registry listener failed for space %r", space)

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
                self._set_topic_record(endpoint.space, endpoint)
                return None
            reason = REASON_KEY_MISMATCH
        log.warning("endpoint record for space %r ignored (%s); its topic record is removed", space, reason)
        self._drop_topic_record(space)
        return reason

    def _drop_topic_record(self, space: str) -> None:
        self._set_topic_record(space, None)

    def all(self) -> list[Endpoint]:
        """Every endpoint record in effect (active or not), one per Space."""
        with self._lock:
            merged = {**self._from_file, **self._from_topic}
        return sorted(merged.values(), key=lambda ep: ep.space)

    def active_count(self) -> int:
        return sum(1 for ep in self.all() if ep.active)
