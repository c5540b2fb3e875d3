"""Settings: defaults, then a TOML file, then PERKAMO_* environment variables, then one validation pass.

Every setting is documented in docs/configuration.md with its default; `Settings.describe()` is the
masked dump operators see from `perkamo-webhooks settings`.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any, Final, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from consumer.constants import EVENTS_TOPIC
from consumer.errors import ConfigError
from consumer.retry_policy import parse_tiers

ENV_PREFIX = "PERKAMO_"
SETTINGS_FILE_ENV = "PERKAMO_SETTINGS_FILE"

CommaList = Annotated[list[str], NoDecode]

_DURATION_RE = re.compile(r"^(\d+)(s|m|h|d)$")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
CONSOLE_SECRET_MIN = 32
CONSOLE_MAX_TTL_S = 30 * 86400  # sessions and scoped links: at most 30 days


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


def kafka_env_name(prop: str) -> str:
    """The environment name that sets a librdkafka property: sasl.password -> PERKAMO_KAFKA_SASL_PASSWORD."""
    return KAFKA_ENV_PREFIX + prop.upper().replace(".", "_")


def is_secret_property(prop: str) -> bool:
    """librdkafka properties whose value is a secret: masked in `settings`, never logged."""
    name = prop.lower()
    return any(word in name for word in ("password", "secret", "sasl.oauthbearer", "ssl.key",
                                         "private.key", "jaas", "token", "keystore", "ssl_key"))


def _read_secret_file(env_name: str, path: Any) -> str:
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


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """All settings of the service. Field `x` is read from env `PERKAMO_X` or key `x` in the file."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    kafka_bootstrap_servers: str = "localhost:9092"
    # librdkafka properties for every client: PERKAMO_KAFKA_<NAME> or the file's [kafka] table.
    kafka: dict[str, str] = Field(default_factory=dict)
    events_topics: CommaList = Field(default_factory=lambda: [EVENTS_TOPIC])
    group_id: str = "perkamo-webhooks"
    # The history role's own group on perkamo.webhooks.attempts.
    history_group_id: str = "perkamo-webhooks-history"
    # "consumer" = KIP-848 protocol (Kafka 4); "classic" = cooperative-sticky assignment.
    group_protocol: Literal["consumer", "classic"] = "consumer"
    data_dir: Path = Path("data")
    history_dsn: str = ""  # empty: chdb:// under data_dir
    history_ttl_days: int = Field(90, ge=1)
    history_batch_rows: int = Field(5000, ge=1)
    history_flush_interval_s: float = Field(1.0, gt=0)
    history_password: SecretStr = SecretStr("")
    history_password_file: Path | None = None
    history_ca_bundle: Path | None = None
    history_query_timeout_s: float = Field(10.0, gt=0, le=600)
    history_max_concurrent_queries: int = Field(4, ge=1, le=64)
    history_max_span_days: float = Field(31.0, gt=0, le=3660)
    endpoints_file: Path | None = None
    delivery_timeout_s: float = Field(5.0, gt=0, le=300)
    retry_tiers: CommaList = Field(default_factory=lambda: ["10s", "1m", "10m", "1h", "6h", "24h"])
    allow_private_networks: CommaList = Field(default_factory=list)
    ca_bundle: Path | None = None
    https_proxy: str = ""
    dns_threads: int = Field(8, ge=1, le=256)
    admin_listen: str = "127.0.0.1:9464"  # the history role (and `all`): history API, console
    # The deliver role's /metrics and probes; worker i of `--workers N` listens on port + i.
    deliver_admin_listen: str = "127.0.0.1:9465"
    admin_token: SecretStr = SecretStr("")
    # The delivery console (/console/ on the admin listener). Its signing key comes from
    # console_secret, or from admin_token (HKDF) when that is empty.
    console_secret: SecretStr = SecretStr("")
    console_session_ttl: str = "8h"
    console_url: str = ""  # empty: http://<admin listen>/console/
    admin_token_file: Path | None = None
    admin_read_token: SecretStr = SecretStr("")
    admin_read_token_file: Path | None = None
    admin_allowed_hosts: CommaList = Field(default_factory=list)
    max_in_flight: int = Field(1000, ge=1)
    max_in_flight_per_endpoint: int = Field(50, ge=1)
    partition_window: int = Field(5000, ge=1)
    max_payload_bytes: int = Field(1_048_576, ge=1024)
    response_excerpt_bytes: int = Field(1024, ge=0, le=65_536)
    # The circuit opens when, over breaker_window_s, at least breaker_min_calls calls were
    # made and at least breaker_failure_rate of them found the endpoint unavailable.
    breaker_window_s: float = Field(30.0, gt=0, le=3600)
    breaker_min_calls: int = Field(20, ge=1)
    breaker_failure_rate: float = Field(0.5, gt=0, le=1)
    breaker_cooldown_s: float = Field(5.0, gt=0)  # doubles after each failed probe...
    breaker_cooldown_max_s: float = Field(300.0, gt=0)  # ...up to this
    breaker_ramp_s: float = Field(5.0, gt=0)  # half-open closes at the latest this long after a success
    health_window_s: float = Field(300.0, gt=0, le=86400)
    health_degraded_rate: float = Field(0.05, gt=0, le=1)
    commit_interval_s: float = Field(1.0, gt=0)
    lag_interval_s: float = Field(5.0, ge=0.1)  # librdkafka statistics -> consumer lag gauge
    drain_timeout_s: float = Field(25.0, gt=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    metrics_enabled: bool = True
    metrics_max_label_values: int = Field(100, ge=1, le=100_000)
    metrics_event_types: CommaList = Field(default_factory=list)
    # Send the attempt span's `traceparent` to the receiver (off: exactly the v1 contract's headers).
    trace_propagation: bool = False
    # DNS/connect/TLS/first-byte timings per attempt from aiohttp's hooks (consumer.nettiming).
    network_timings: bool = True

    @model_validator(mode="before")
    @classmethod
    def _secret_files(cls, data: Any) -> Any:
        """PERKAMO_<SECRET>_FILE: read the secret from a mounted file (one of the two, not both)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name in ("admin_token", "admin_read_token", "history_password"):
            path = data.get(f"{name}_file")
            if path in (None, ""):
                continue
            env = ENV_PREFIX + name.upper()
            given = data.get(name)
            if isinstance(given, SecretStr):
                given = given.get_secret_value()
            if given not in (None, ""):
                raise ValueError(f"{env} and {env}_FILE are both set: set one of them")
            data[name] = _read_secret_file(f"{env}_FILE", path)
        return data

    @field_validator("kafka", mode="before")
    @classmethod
    def _kafka_properties(cls, value: Any) -> Any:
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
                text = _read_secret_file(env, text)
            if name in KAFKA_RESERVED:
                raise ValueError(f"{kafka_env_name(name)}: {name} is set by the service and cannot "
                                 f"be changed ({KAFKA_RESERVED[name]})")
            if name in props and props[name] != text:
                raise ValueError(f"{kafka_env_name(name)}: set both directly and from a file; "
                                 "set one of them")
            props[name] = text
        return props

    @field_validator("admin_token", "admin_read_token")
    @classmethod
    def _token_strength(cls, value: SecretStr, info: Any) -> SecretStr:
        token = value.get_secret_value()
        env = ENV_PREFIX + str(info.field_name).upper()
        if not token:
            return value
        if token.strip() in TOKEN_PLACEHOLDERS or "CHANGE-ME" in token:
            raise ValueError(f"{env} is a placeholder shipped in deploy/; generate a token with "
                             "`openssl rand -hex 32`")
        if len(token) < MIN_TOKEN_CHARS:
            raise ValueError(f"{env} must be at least {MIN_TOKEN_CHARS} characters (it has "
                             f"{len(token)}); generate one with `openssl rand -hex 32`")
        if not token.isascii() or not token.isprintable() or any(ch.isspace() for ch in token):
            raise ValueError(f"{env} must be printable ASCII without spaces")
        return value

    @model_validator(mode="after")
    def _distinct_tokens(self) -> Settings:
        read = self.admin_read_token.get_secret_value()
        if read and read == self.admin_token.get_secret_value():
            raise ValueError("PERKAMO_ADMIN_READ_TOKEN equals PERKAMO_ADMIN_TOKEN: give the "
                             "read-only token a value of its own")
        userinfo = self.history_dsn.partition("://")[2].partition("/")[0].rpartition("@")[0]
        if self.history_password.get_secret_value() and ":" in userinfo:
            raise ValueError("PERKAMO_HISTORY_PASSWORD is set and PERKAMO_HISTORY_DSN carries "
                             "user:password@ too: keep the password in one place")
        return self

    @field_validator("admin_allowed_hosts")
    @classmethod
    def _allowed_hosts(cls, value: list[str]) -> list[str]:
        for host in value:
            if not host.isascii() or not host.isprintable() or "/" in host or " " in host:
                raise ValueError(f"{host!r} is not a host name, an address or HOST:PORT")
        return [host.lower() for host in value]

    @field_validator("events_topics", "retry_tiers", "allow_private_networks",
                     "admin_allowed_hosts", "metrics_event_types", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _split_commas(value)

    @field_validator("events_topics")
    @classmethod
    def _topics_nonempty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one topic is required")
        return value

    @field_validator("retry_tiers")
    @classmethod
    def _tiers(cls, value: list[str]) -> list[str]:
        parse_tiers(value)  # raises ValueError with the bad tier named
        return value

    @field_validator("allow_private_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise ValueError(f"{cidr!r} is not a CIDR network ({exc})") from None
        return value

    @field_validator("admin_listen", "deliver_admin_listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        _host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:9464")
        return value

    @model_validator(mode="after")
    def _cooldowns(self) -> Settings:
        if self.breaker_cooldown_max_s < self.breaker_cooldown_s:
            raise ValueError(
                "PERKAMO_BREAKER_COOLDOWN_MAX_S must be at least PERKAMO_BREAKER_COOLDOWN_S"
            )
        return self

    @field_validator("console_secret")
    @classmethod
    def _console_secret(cls, value: SecretStr) -> SecretStr:
        if value.get_secret_value() and len(value.get_secret_value()) < CONSOLE_SECRET_MIN:
            raise ValueError(f"must be at least {CONSOLE_SECRET_MIN} characters (or empty)")
        return value

    @field_validator("console_session_ttl")
    @classmethod
    def _console_ttl(cls, value: str) -> str:
        if parse_duration(value) > CONSOLE_MAX_TTL_S:
            raise ValueError("must be at most 30d")
        return value

    @field_validator("console_url")
    @classmethod
    def _console_url(cls, value: str) -> str:
        if not value:
            return value
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise ValueError("expected an http(s):// URL, e.g. https://support.example.com/console/") \
                from None
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ValueError("expected an http(s):// URL, e.g. https://support.example.com/console/")
        return value if value.endswith("/") else value + "/"

    @field_validator("ca_bundle", "endpoints_file", "history_ca_bundle")
    @classmethod
    def _file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"no such file: {value}")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [
            init_settings, env_settings, KafkaEnvSource(settings_cls)
        ]
        settings_file = os.environ.get(SETTINGS_FILE_ENV)
        if settings_file:
            if not Path(settings_file).is_file():
                raise ConfigError(f"{SETTINGS_FILE_ENV}: no such file: {settings_file}")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=settings_file))
        return tuple(sources)

    # Derived values -------------------------------------------------------------------

    @property
    def history_dsn_resolved(self) -> str:
        if self.history_dsn:
            return self.history_dsn
        return f"chdb://{(self.data_dir / 'history').resolve()}"

    @property
    def tier_seconds(self) -> list[tuple[str, float]]:
        return parse_tiers(self.retry_tiers)

    @property
    def admin_host_port(self) -> tuple[str, int]:
        host, _, port = self.admin_listen.rpartition(":")
        return host.strip("[]"), int(port)

    def deliver_host_port(self, worker: int = 0) -> tuple[str, int]:
        """Where deliver worker `worker` serves /metrics and its probes."""
        host, _, port = self.deliver_admin_listen.rpartition(":")
        return host.strip("[]"), int(port) + worker if int(port) else 0

    @property
    def console_session_ttl_s(self) -> float:
        return parse_duration(self.console_session_ttl)

    @property
    def console_base_url(self) -> str:
        """Where the console is reached: PERKAMO_CONSOLE_URL, or the admin listener's /console/."""
        if self.console_url:
            return self.console_url
        host, port = self.admin_host_port
        if host in ("0.0.0.0", "::", ""):  # noqa: S104 - a wildcard bind is reached on loopback
            host = "127.0.0.1"
        return f"http://[{host}]:{port}/console/" if ":" in host else f"http://{host}:{port}/console/"

    @property
    def history_password_value(self) -> str:
        """PERKAMO_HISTORY_PASSWORD (or its _FILE); '' leaves the DSN's own password, if any."""
        return self.history_password.get_secret_value()

    def describe(self) -> dict[str, str]:
        """Every setting as its env name and value, with secrets masked."""
        out: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if name == "kafka":
                for prop, text in sorted(self.kafka.items()):
                    out[kafka_env_name(prop)] = "********" if is_secret_property(prop) else text
                continue
            if isinstance(value, SecretStr):
                shown = "********" if value.get_secret_value() else ""
            elif name in ("https_proxy", "history_dsn") and value:
                shown = _mask_userinfo(str(value))
            elif isinstance(value, list):
                shown = ",".join(value)
            else:
                shown = "" if value is None else str(value)
            out[ENV_PREFIX + name.upper()] = shown
        return out


def _mask_userinfo(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    authority, slash, path = rest.partition("/")
    if sep and "@" in authority:
        return f"{scheme}://********@{authority.rpartition('@')[2]}{slash}{path}"
    return url


def setting_names() -> list[str]:
    """The environment names of every setting (PERKAMO_SETTINGS_FILE included); any
    PERKAMO_KAFKA_<NAME> is a setting too (see `is_setting_name`)."""
    return [ENV_PREFIX + name.upper() for name in Settings.model_fields if name != "kafka"] + [
        SETTINGS_FILE_ENV
    ]


def is_setting_name(name: str) -> bool:
    """A PERKAMO_* environment name this service reads (librdkafka passthrough included)."""
    return name in setting_names() or (
        name.startswith(KAFKA_ENV_PREFIX) and len(name) > len(KAFKA_ENV_PREFIX)
    )


# Settings that were replaced: setting one now would silently do nothing, so say what to use.
REPLACED: dict[str, str] = {
    "PERKAMO_BREAKER_FAILURES": "the circuit now opens on a failure rate: use "
    "PERKAMO_BREAKER_MIN_CALLS and PERKAMO_BREAKER_FAILURE_RATE (see docs/configuration.md)",
    "PERKAMO_HISTORY_MAX_BUFFERED_ROWS": "attempt records now wait on perkamo.webhooks.attempts "
    "while the history store is slow, so deliveries never pause for it; remove the setting "
    "(PERKAMO_HISTORY_BATCH_ROWS bounds the history role's memory)",
}


def load_settings(**overrides: Any) -> Settings:
    """Read and validate settings; a bad one raises ConfigError naming it."""
    for name, instead in REPLACED.items():
        if name in os.environ:
            raise ConfigError(f"{name} is no longer a setting: {instead}")
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            message = str(err["msg"]).removeprefix("Value error, ")
            field = str(err["loc"][0]) if err["loc"] else ""
            if not field or message.startswith(ENV_PREFIX):
                problems.append(message)  # the message names its setting itself
                continue
            problems.append(f"{ENV_PREFIX + field.upper()}: {message}")
        raise ConfigError("invalid settings: " + "; ".join(problems)) from None
    except (OSError, ValueError) as exc:  # unreadable or malformed TOML file
        raise ConfigError(f"{SETTINGS_FILE_ENV}: {exc}") from None
