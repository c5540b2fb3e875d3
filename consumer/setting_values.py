"""The values settings take: parsers and checks of one value each, and the Kafka passthrough.

Pure functions of a value that raise ValueError saying what is expected; `consumer.config`'s
Settings calls them from its validators, so the message names the setting. Nothing here knows
the Settings class.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from pydantic.fields import FieldInfo
from pydantic_settings import PydanticBaseSettingsSource

ENV_PREFIX: Final = "PERKAMO_"

_DURATION_RE = re.compile(r"^(\d+)(s|m|h|d)$")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
CONSOLE_SECRET_MIN: Final = 32
CONSOLE_MAX_TTL_S: Final = 30 * 86400  # sessions and scoped links: at most 30 days


def parse_duration(text: str) -> float:
    """`90s`, `30m`, `8h`, `7d` -> seconds; raises ValueError saying what is expected."""
    match = _DURATION_RE.match(text.strip())
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"{text[:20]!r} is not a duration like 30m, 8h, 7d")
    return float(int(match.group(1)) * _DURATION_UNITS[match.group(2)])


# PERKAMO_KAFKA_<NAME> sets librdkafka property <name> (`_` read as `.`); these are the one
# exception, a setting of its own (bootstrap.servers).
KAFKA_ENV_PREFIX: Final = "PERKAMO_KAFKA_"
_KAFKA_OWN_SETTINGS: Final = frozenset({"PERKAMO_KAFKA_BOOTSTRAP_SERVERS"})
_KAFKA_PROPERTY_RE: Final = re.compile(r"^[a-z0-9][a-z0-9._]{0,127}$")
# Properties the service sets itself because its guarantees rest on them (offsets committed
# only when durable, idempotent acks=all publishing, one group): not overridable.
KAFKA_RESERVED: Final[dict[str, str]] = {
    "bootstrap.servers": "use PERKAMO_KAFKA_BOOTSTRAP_SERVERS",
    "group.id": "use PERKAMO_GROUP_ID",
    "group.protocol": "use PERKAMO_GROUP_PROTOCOL",
    "enable.auto.commit": "offsets are committed only once their outcome is durable",
    "enable.auto.offset.store": "offsets are stored only once their outcome is durable",
    "enable.idempotence": "retry and DLQ publishes must be idempotent",
    "acks": "retry and DLQ publishes wait for acks=all",
    "enable.partition.eof": "the registry reader depends on it",
}
# The shipped deploy files' placeholder tokens (compose, k8s Secret): refused at start-up.
# tests/test_deploy_static.py checks that every placeholder in deploy/ is listed here.
TOKEN_PLACEHOLDERS: Final = frozenset({
    "CHANGE-ME", "CHANGE-ME-admin-token", "CHANGE-ME-read-token", "perkamo-local-admin-token",
    "changeme", "change-me", "secret", "token", "admin",
})
MIN_TOKEN_CHARS: Final = 32
_CONSOLE_URL_EXPECTED: Final = "expected an http(s):// URL, e.g. https://support.example.com/console/"


def kafka_env_name(prop: str) -> str:
    """The environment name that sets a librdkafka property: sasl.password -> PERKAMO_KAFKA_SASL_PASSWORD."""
    return KAFKA_ENV_PREFIX + prop.upper().replace(".", "_")


def is_secret_property(prop: str) -> bool:
    """librdkafka properties whose value is a secret: masked in `settings`, never logged."""
    name = prop.lower()
    return any(word in name for word in ("password", "secret", "sasl.oauthbearer", "ssl.key",
                                         "private.key", "jaas", "token", "keystore", "ssl_key"))


def read_secret_file(env_name: str, path: Any) -> str:
    """The secret in a mounted file (trailing newline dropped); a problem names the setting."""
    try:
        text = Path(str(path)).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ValueError(f"{env_name}: cannot read {path} ({reason})") from None
    value = text.rstrip("\r\n")
    if not value.strip():
        raise ValueError(f"{env_name}: {path} is empty")
    return value


class KafkaEnvSource(PydanticBaseSettingsSource):
    """PERKAMO_KAFKA_<NAME>=value -> {"kafka": {"<name>": value}} (`_` read as `.`, lower case).

    PERKAMO_KAFKA_BOOTSTRAP_SERVERS stays the setting it always was."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        props = {
            name[len(KAFKA_ENV_PREFIX):].lower().replace("_", "."): value
            for name, value in os.environ.items()
            if name.upper().startswith(KAFKA_ENV_PREFIX) and name.upper() not in _KAFKA_OWN_SETTINGS
        }
        return {"kafka": props} if props else {}


def kafka_properties(value: Any) -> dict[str, str]:
    """The [kafka] table or the PERKAMO_KAFKA_* names -> librdkafka properties as strings;
    `<secret>.file` is read from the file, a reserved property is refused."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError("the [kafka] table must map librdkafka property names to values")
    props: dict[str, str] = {}
    for raw_name, raw in value.items():
        name = str(raw_name).strip().lower()
        env = kafka_env_name(name)
        if not _KAFKA_PROPERTY_RE.match(name):
            raise ValueError(f"{env}: {raw_name!r} is not a librdkafka property name")
        if isinstance(raw, bool):
            text = "true" if raw else "false"
        elif isinstance(raw, (str, int, float)):
            text = str(raw)
        else:
            raise ValueError(f"{env}: the value must be a string, number or boolean")
        if name.endswith(".file") and is_secret_property(name.removesuffix(".file")):
            name = name.removesuffix(".file")
            text = read_secret_file(env, text)
        if name in KAFKA_RESERVED:
            raise ValueError(f"{kafka_env_name(name)}: {name} is set by the service and cannot "
                             f"be changed ({KAFKA_RESERVED[name]})")
        if name in props and props[name] != text:
            raise ValueError(f"{kafka_env_name(name)}: set both directly and from a file; "
                             "set one of them")
        props[name] = text
    return props


def check_token(env: str, token: str) -> None:
    """An admin token must not be a shipped placeholder and must be long, printable ASCII."""
    if not token:
        return
    if token.strip() in TOKEN_PLACEHOLDERS or "CHANGE-ME" in token:
        raise ValueError(f"{env} is a placeholder shipped in deploy/; generate a token with "
                         "`openssl rand -hex 32`")
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"{env} must be at least {MIN_TOKEN_CHARS} characters (it has "
                         f"{len(token)}); generate one with `openssl rand -hex 32`")
    if not token.isascii() or not token.isprintable() or any(ch.isspace() for ch in token):
        raise ValueError(f"{env} must be printable ASCII without spaces")


def split_commas(value: Any) -> Any:
    """`a, b,,c` -> ["a", "b", "c"]; a list (from the TOML file) passes unchanged."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def allowed_hosts(value: list[str]) -> list[str]:
    """Host names, addresses or HOST:PORT, lower-cased."""
    for host in value:
        if not host.isascii() or not host.isprintable() or "/" in host or " " in host:
            raise ValueError(f"{host!r} is not a host name, an address or HOST:PORT")
    return [host.lower() for host in value]


def check_networks(value: list[str]) -> None:
    """Every entry is a CIDR network."""
    for cidr in value:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError as exc:
            raise ValueError(f"{cidr!r} is not a CIDR network ({exc})") from None


def check_listen(value: str) -> None:
    """HOST:PORT with a port in 0..65535."""
    _host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:9464")


def console_url(value: str) -> str:
    """An http(s) base URL without query or fragment, ending in `/`; '' stays ''."""
    if not value:
        return value
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError(_CONSOLE_URL_EXPECTED) from None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(_CONSOLE_URL_EXPECTED)
    return value if value.endswith("/") else value + "/"


def check_console_secret(env: str, secret: str) -> None:
    """The console's signing secret: no shipped or `change-me`-style placeholder, at least
    CONSOLE_SECRET_MIN printable characters; '' (a key derived from the admin token) passes."""
    if not secret:
        return
    folded = secret.strip().lower()
    if folded in _FOLDED_PLACEHOLDERS or any(word in folded for word in _PLACEHOLDER_WORDS):
        raise ValueError(f"{env} is a placeholder, not a secret; generate one with "
                         "`openssl rand -hex 32`")
    if len(secret) < CONSOLE_SECRET_MIN:
        raise ValueError(f"{env} must be at least {CONSOLE_SECRET_MIN} characters (it has "
                         f"{len(secret)}); generate one with `openssl rand -hex 32`, or leave "
                         "it empty to derive the key from PERKAMO_ADMIN_TOKEN")
    if not secret.isprintable():
        raise ValueError(f"{env} must be printable characters (no control characters)")


_FOLDED_PLACEHOLDERS: Final = frozenset(p.lower() for p in TOKEN_PLACEHOLDERS)
_PLACEHOLDER_WORDS: Final = ("change-me", "changeme", "change_me", "replace-me", "replaceme",
                             "replace_me")
# Query parameters whose value is a credential, by any part of their name: masked in `settings`.
_SECRET_PARAM_WORDS: Final = ("pass", "pwd", "secret", "token", "key", "sig", "auth",
                              "credential", "session", "cookie")
MASK: Final = "********"


def mask_url(url: str) -> str:
    """The URL with its credentials replaced by ********: any user:password@, and the value of
    every query parameter whose name says it is a secret (password, token, key, sig, ...).

    Errs towards hiding: the user part ends at the last `@` before the query, even in what a
    strict parser would call the path (an unencoded `/` in a password is common)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    head, mark, tail = _split_query(rest)
    if "@" in head:
        head = f"{MASK}@{head.rpartition('@')[2]}"
    if mark == "?":
        query, hash_mark, fragment = tail.partition("#")
        tail = "&".join(_mask_param(part) for part in query.split("&")) + hash_mark + fragment
    return f"{scheme}://{head}{mark}{tail}"


def _split_query(rest: str) -> tuple[str, str, str]:
    """`host/path?q#f` -> (`host/path`, `?`, `q#f`); the mark is whichever of ? or # comes first."""
    cut = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=-1)
    return (rest, "", "") if cut < 0 else (rest[:cut], rest[cut], rest[cut + 1:])


def _mask_param(part: str) -> str:
    name, eq, _value = part.partition("=")
    if eq and any(word in name.lower() for word in _SECRET_PARAM_WORDS):
        return f"{name}={MASK}"
    return part
