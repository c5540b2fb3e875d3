"""`perkamo-webhooks endpoints set | list | remove`: the endpoint registry topic by hand.

Each command talks to Kafka only (docs/architecture.md, endpoints): `set` publishes an
endpoint record (key = the Space's slug) to the compacted topic `perkamo.webhooks.endpoints`
and waits for the broker's acknowledgement, `remove` publishes a tombstone, `list` reads the
topic to its end. Running consumers follow the topic and apply a change within seconds.

A record is validated here exactly as the consumer validates it (`endpoints.parse_record`),
so what the CLI accepts the consumer applies. Endpoint URLs are secrets: `list` shows
`https://host/…` unless asked for `--show-urls`; signing secrets are never shown.

`list` also shows each endpoint's health (healthy, degraded, failing, circuit_open; its recent
failure rate, deliveries held, last success and failure) and when its TLS certificate expires,
as the deliver role saw it on its latest new connection: it asks the history role's admin API
(`/api/v1/endpoints/health`, PERKAMO_ADMIN_LISTEN and the read token), which learns both from
the attempt records of every deliver process. Without an answer those columns say `?` and a
note on stderr says why.
"""

from __future__ import annotations

import argparse
import re
import sys
from functools import cache
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import orjson
from rich.console import Console
from rich.table import Table

from consumer.addresses import AddressPolicy
from consumer.config import Settings
from consumer.constants import ENDPOINTS_TOPIC
from consumer.endpoints import EndpointRegistry, load_file, mask_url, parse_record, record_of
from consumer.errors import BlockedAddress, InvalidEndpoint, PerkamoError
from consumer.kafka_reader import read_all
from consumer.models import Endpoint
from consumer.registry_publish import check_registry_topic, publish_registry_record
from consumer.schemas import schema_path

EXIT_INVALID: Final = 2  # same as argparse's usage errors: nothing was published
_HEALTH_TIMEOUT_S: Final = 3.0
_CERT_WARN_DAYS: Final = 14  # as the alert PerkamoWebhookEndpointCertExpiring
# What `list --json` shows of the history role's health view (the certificate has columns of its own).
_HEALTH_FIELDS: Final = ("state", "circuit", "failure_rate", "calls", "window_s", "held",
                          "last_success_at", "last_failure_at", "last_error_kind")
_SCHEMA: Final = "endpoint.schema.json"


class _Refused(PerkamoError):
    """A command line or record that is refused before anything is sent to Kafka."""


def add_subcommands(sub: Any) -> None:
    """Register `endpoints set|list|remove` on the `perkamo-webhooks` parser."""
    endpoints = sub.add_parser(
        "endpoints",
        help="set, list or remove Spaces' webhook endpoints (registry topic)",
        description=f"Manage endpoint records on the compacted topic {ENDPOINTS_TOPIC} "
        "(key = space slug). Running consumers apply changes within seconds; per Space a "
        "record on the topic wins over PERKAMO_ENDPOINTS_FILE.",
    )
    commands = endpoints.add_subparsers(dest="endpoints_command", required=True)

    set_cmd = commands.add_parser(
        "set",
        help="create or replace a Space's endpoint",
        description="Validate an endpoint record and publish it. Either --space and --url "
        "(with the optional flags), or --record with the whole record as JSON.",
    )
    set_cmd.add_argument("--space", help="the Space's slug (the record's key)")
    set_cmd.add_argument("--url", help="the endpoint's public https:// URL (a secret)")
    set_cmd.add_argument("--inactive", action="store_true",
                         help="keep the record but deliver nothing "
                         "(events are counted as no endpoint)")
    set_cmd.add_argument("--id", dest="endpoint_id", metavar="ep_…",
                         help="endpoint id (default: derived from the space, stable)")
    set_cmd.add_argument("--signing-secret", dest="signing_secrets", action="append", default=[],
                         metavar="whsec_…",
                         help="sign deliveries (Standard Webhooks); repeat to rotate secrets")
    set_cmd.add_argument("--record", metavar="JSON|@FILE|-",
                         help="the whole endpoint record as JSON, read from FILE, or from stdin "
                         "(keeps secrets out of the shell history)")
    set_cmd.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for Kafka")
    set_cmd.set_defaults(fn=_set)

    list_cmd = commands.add_parser(
        "list",
        help="show the endpoints in effect (URLs masked, secrets never shown)",
        description="Read the registry topic to its end and show each Space's endpoint; "
        "records of PERKAMO_ENDPOINTS_FILE are included when it is set.",
    )
    list_cmd.add_argument("--show-urls", action="store_true",
                          help="show full URLs (they are secrets)")
    list_cmd.add_argument("--json", action="store_true", help="one JSON array on stdout")
    list_cmd.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for Kafka")
    list_cmd.add_argument("--no-health", action="store_true",
                          help="do not ask the history role for health and certificate expiry (Kafka only)")
    list_cmd.set_defaults(fn=_list)

    remove_cmd = commands.add_parser(
        "remove",
        help="remove a Space's endpoint record from the topic (tombstone)",
        description="Publish a tombstone for the Space. If PERKAMO_ENDPOINTS_FILE has a record "
        "for it, consumers fall back to that one.",
    )
    remove_cmd.add_argument("--space", required=True, help="the Space's slug")
    remove_cmd.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for Kafka")
    remove_cmd.set_defaults(fn=_remove)


# Commands ----------------------------------------------------------------------------------


def _set(args: argparse.Namespace, settings: Settings) -> int:
    try:
        doc = _record_from_args(args)
        _precheck(doc)
        endpoint = parse_record(doc)
    except _Refused as exc:
        return _refuse("set", str(exc))
    except InvalidEndpoint as exc:
        return _refuse("set", _explain(str(exc)))
    _warn_if_refused_literal(endpoint, settings)
    value = orjson.dumps(record_of(endpoint))
    partition, offset = _publish(settings, endpoint.space, value, args.timeout)
    secrets = len(endpoint.signing_secrets)
    print(
        f"space {endpoint.space}: endpoint {endpoint.id} {mask_url(endpoint.url)} "
        f"{'active' if endpoint.active else 'INACTIVE'}, "
        f"{secrets} signing secret{'s' if secrets != 1 else ''} -> published to "
        f"{ENDPOINTS_TOPIC} (partition {partition}, offset {offset})"
    )
    return 0


def _remove(args: argparse.Namespace, settings: Settings) -> int:
    if not _slug_ok(args.space):
        return _refuse("remove", f"--space {args.space!r} is not a space slug "
                       f"(pattern {_slug_pattern()})")
    partition, offset = _publish(settings, args.space, None, args.timeout)
    print(
        f"space {args.space}: endpoint record removed from {ENDPOINTS_TOPIC} "
        f"(tombstone at partition {partition}, offset {offset}); "
        "a PERKAMO_ENDPOINTS_FILE record for it, if any, applies again"
    )
    return 0


def _list(args: argparse.Namespace, settings: Settings) -> int:
    records = read_all(settings, ENDPOINTS_TOPIC, args.timeout)
    topic_registry = EndpointRegistry()
    ignored = 0
    if records is None:
        print(f"warning: topic {ENDPOINTS_TOPIC} does not exist; create it with "
              "`perkamo-webhooks topics`", file=sys.stderr)
    else:
        for msg in records:
            if topic_registry.apply(msg.key(), msg.value()) is not None:
                ignored += 1
    if ignored:
        print(f"warning: {ignored} invalid record(s) on {ENDPOINTS_TOPIC} ignored "
              "(consumers ignore them too)", file=sys.stderr)
    rows = _rows(topic_registry.all(), _file_endpoints(settings), args.show_urls)
    health, why = ({}, "") if args.no_health else _health(settings)
    if why:
        print(f"note: health and certificate expiry unknown: {why}", file=sys.stderr)
    for row in rows:
        seen = health.get(row["space"]) or {}
        row["health"] = {key: seen[key] for key in _HEALTH_FIELDS if key in seen} or None
        row["cert_not_after"] = seen.get("cert_not_after")
        row["cert_expires_in_s"] = seen.get("cert_expires_in_s")
    if args.json:
        sys.stdout.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    if not rows:
        print("no endpoints")
        return 0
    table = Table("space", "endpoint id", "active", "url", "signing secrets", "source",
                  "health", "last success", "certificate expires")
    unknown = "?" if why else "—"
    for row in rows:
        table.add_row(row["space"], row["id"], "yes" if row["active"] else "no", row["url"],
                      str(row["signing_secret_count"]), row["source"],
                      _state(row["health"]) or unknown,
                      ((row["health"] or {}).get("last_success_at") or "")[:19].replace("T", " ")
                      or unknown,
                      _expiry(row["cert_not_after"], row["cert_expires_in_s"]) or unknown)
    # Not a terminal: never wrap or crop (scripts grep this), however wide it gets.
    Console(width=None if sys.stdout.isatty() else 10_000).print(table)
    return 0


# Helpers -----------------------------------------------------------------------------------


def _rows(
    topic_eps: list[Endpoint], file_eps: list[Endpoint], show_urls: bool
) -> list[dict[str, Any]]:
    """One row per Space, the topic's record winning over the file's (as in the consumer)."""
    on_topic = {ep.space: ep for ep in topic_eps}
    in_file = {ep.space: ep for ep in file_eps}
    rows = []
    for space in sorted(on_topic.keys() | in_file.keys()):
        endpoint = on_topic.get(space) or in_file[space]
        if space not in on_topic:
            source = "file"
        elif space in in_file:
            source = "topic (overrides file)"
        else:
            source = "topic"
        rows.append({
            "space": space,
            "id": endpoint.id,
            "active": endpoint.active,
            "url": endpoint.url if show_urls else mask_url(endpoint.url),
            "signing_secret_count": len(endpoint.signing_secrets),
            "source": source,
        })
    return rows


def _health(settings: Settings) -> tuple[dict[str, dict[str, Any]], str]:
    """Per Space, the history role's view of its endpoint (certificate expiry included), or
    ({}, why not)."""
    from consumer.admin_api_client import AdminApiClient
    from consumer.errors import ApiFailure

    client = AdminApiClient(settings, timeout=_HEALTH_TIMEOUT_S)
    try:
        doc = client.get("/endpoints/health")
    except ApiFailure as exc:
        hint = " (set PERKAMO_ADMIN_READ_TOKEN)" if exc.status in (401, 403) else ""
        return {}, f"the history role's admin API at {client.base} answered {exc.status}{hint}"
    except PerkamoError:
        return {}, f"the history role's admin API at {client.base} did not answer (PERKAMO_ADMIN_LISTEN)"
    endpoints = doc.get("endpoints")
    return (endpoints if isinstance(endpoints, dict) else {}), ""


def _state(seen: dict[str, Any] | None) -> str:
    """`failing: 62% of 40 calls in 300s, 3 held`; '' when no attempt was seen since start."""
    if not seen or "state" not in seen:
        return ""
    text = str(seen["state"])
    if seen.get("calls"):
        text += (f": {float(seen.get('failure_rate') or 0):.0%} failed of {seen['calls']} calls"
                 f" in {seen.get('window_s', 0):.0f}s")
    if seen.get("held"):
        text += f", {seen['held']} held"
    return text


def _expiry(not_after: str | None, left_s: float | None) -> str:
    """`2026-07-01 (in 42 days)`; '' when no new TLS connection was seen since start."""
    if not not_after or left_s is None:
        return ""
    days = left_s / 86400
    when = f"in {days:.0f} days" if days >= 0 else f"EXPIRED {-days:.0f} days ago"
    warn = "  RENEW" if 0 <= days < _CERT_WARN_DAYS else ""
    return f"{not_after[:10]} ({when}){warn}"


def _file_endpoints(settings: Settings) -> list[Endpoint]:
    return load_file(settings.endpoints_file) if settings.endpoints_file else []


def _record_from_args(args: argparse.Namespace) -> Any:
    """The record to validate: --record's JSON, or one built from the flags."""
    if args.record is not None:
        given = {
            "--url": args.url is not None,
            "--inactive": args.inactive,
            "--id": args.endpoint_id is not None,
            "--signing-secret": bool(args.signing_secrets),
        }
        combined = [flag for flag, present in given.items() if present]
        if combined:
            raise _Refused(f"--record carries the whole record; drop {', '.join(combined)}")
        parsed = _load_json(_read_record_arg(args.record))
        if args.space is not None and (
            not isinstance(parsed, dict) or parsed.get("space") != args.space
        ):
            raise _Refused(f"--space {args.space!r} does not match the record's space")
        return parsed
    missing = [flag for flag, value in (("--space", args.space), ("--url", args.url)) if not value]
    if missing:
        raise _Refused(f"{' and '.join(missing)} required (or --record with the whole record)")
    doc: dict[str, Any] = {"space": args.space, "url": args.url, "active": not args.inactive}
    if args.endpoint_id is not None:
        doc["id"] = args.endpoint_id
    if args.signing_secrets:
        doc["signing_secrets"] = list(args.signing_secrets)
    return doc


def _read_record_arg(value: str) -> bytes:
    if value == "-":
        return sys.stdin.buffer.read()
    if value.startswith("@"):
        try:
            return Path(value[1:]).read_bytes()
        except OSError as exc:
            raise _Refused(f"--record {value}: {exc.strerror}") from None
    return value.encode()


def _load_json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # orjson's message names the position only, never the text around it
        raise _Refused(f"the record is not valid JSON ({exc})") from None


def _precheck(doc: Any) -> None:
    """Clear messages for the common mistakes, before the schema's terse ones."""
    if not isinstance(doc, dict):
        raise _Refused("the record must be a JSON object like "
                       '{"space": "<slug>", "url": "https://…", "active": true}')
    allowed = _schema_fields()
    unknown = sorted(set(doc) - set(allowed))
    if unknown:
        raise _Refused(f"unknown field(s) {', '.join(unknown)}; an endpoint record has "
                       f"{', '.join(allowed)}")
    url = doc.get("url")
    if isinstance(url, str):
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme != "https":
            shown = f"{scheme}:" if scheme else "no scheme"
            raise _Refused(f"url must be an https:// URL (got {shown}); plain http and other "
                           "schemes are refused")
        if "@" in parts.netloc:
            raise _Refused("url must not carry credentials (user:password@); sign deliveries "
                           "with --signing-secret instead")
    secrets = doc.get("signing_secrets")
    if isinstance(secrets, list) and any(
        not isinstance(s, str) or not s.startswith("whsec_") for s in secrets
    ):
        raise _Refused("a signing secret must be whsec_ followed by the base64 of the key")
    space = doc.get("space")
    if isinstance(space, str) and not _slug_ok(space):
        raise _Refused(f"space {space!r} is not a space slug (pattern {_slug_pattern()})")


def _explain(message: str) -> str:
    """parse_record's schema messages name fastjsonschema's `data.<field>`; name the field."""
    if message.startswith("data."):
        return f"field {message.removeprefix('data.')} (see schemas/{_SCHEMA})"
    if message.startswith("data "):
        return f"the record {message.removeprefix('data ')} (see schemas/{_SCHEMA})"
    return message


def _refuse(command: str, message: str) -> int:
    print(f"perkamo-webhooks endpoints {command}: {message}; nothing published", file=sys.stderr)
    return EXIT_INVALID


def _warn_if_refused_literal(endpoint: Endpoint, settings: Settings) -> None:
    """An IP-literal host the SSRF guard refuses would never be delivered to: say so now."""
    try:
        AddressPolicy(settings.allow_private_networks).check_literal(endpoint.host)
    except BlockedAddress as exc:
        print(f"warning: consumers will refuse this endpoint unless PERKAMO_ALLOW_PRIVATE_NETWORKS "
              f"lists its address ({exc.reason})", file=sys.stderr)


@cache
def _schema() -> dict[str, Any]:
    doc: dict[str, Any] = orjson.loads(schema_path(_SCHEMA).read_bytes())
    return doc


def _schema_fields() -> list[str]:
    return list(_schema()["properties"])


def _slug_pattern() -> str:
    return str(_schema()["properties"]["space"]["pattern"])


def _slug_ok(space: str) -> bool:
    return re.fullmatch(_slug_pattern(), space) is not None


def _publish(settings: Settings, space: str, value: bytes | None, timeout: float) -> tuple[int, int]:
    """Publish one record (None = tombstone) keyed by the space; returns (partition, offset)."""
    warning = check_registry_topic(settings, timeout)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    return publish_registry_record(settings, space, value, timeout)
