"""Settings: defaults, then a TOML file, then PERKAMO_* environment variables, then one validation pass.

Every setting is documented in docs/configuration.md with its default; `Settings.describe()` is the
masked dump operators see from `perkamo-webhooks settings`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from consumer import setting_values as values
from consumer.constants import EVENTS_TOPIC
from consumer.errors import ConfigError
from consumer.retry_policy import parse_tiers
from consumer.setting_values import (
    CONSOLE_MAX_TTL_S,
    ENV_PREFIX,
    KAFKA_ENV_PREFIX,
    KafkaEnvSource,
    is_secret_property,
    kafka_env_name,
    parse_duration,
)

SETTINGS_FILE_ENV = "PERKAMO_SETTINGS_FILE"

CommaList = Annotated[list[str], NoDecode]


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
    console_secret_file: Path | None = None
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
    # DNS/connect/TLS/first-byte timings per attempt (consumer.nettiming).
    network_timings: bool = True

    @model_validator(mode="before")
    @classmethod
    def _secret_files(cls, data: Any) -> Any:
        """PERKAMO_<SECRET>_FILE: read the secret from a mounted file (one of the two, not both)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name in ("admin_token", "admin_read_token", "history_password", "console_secret"):
            path = data.get(f"{name}_file")
            if path in (None, ""):
                continue
            env = ENV_PREFIX + name.upper()
            given = data.get(name)
            if isinstance(given, SecretStr):
                given = given.get_secret_value()
            if given not in (None, ""):
                raise ValueError(f"{env} and {env}_FILE are both set: set one of them")
            data[name] = values.read_secret_file(f"{env}_FILE", path)
        return data

    @field_validator("kafka", mode="before")
    @classmethod
    def _kafka_properties(cls, value: Any) -> Any:
        return values.kafka_properties(value)

    @field_validator("admin_token", "admin_read_token")
    @classmethod
    def _token_strength(cls, value: SecretStr, info: Any) -> SecretStr:
        values.check_token(ENV_PREFIX + str(info.field_name).upper(), value.get_secret_value())
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
        return values.allowed_hosts(value)

    @field_validator("events_topics", "retry_tiers", "allow_private_networks",
                     "admin_allowed_hosts", "metrics_event_types", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return values.split_commas(value)

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
        values.check_networks(value)
        return value

    @field_validator("admin_listen", "deliver_admin_listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        values.check_listen(value)
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
        values.check_console_secret(ENV_PREFIX + "CONSOLE_SECRET", value.get_secret_value())
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
        return values.console_url(value)

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
                    out[kafka_env_name(prop)] = ("********" if is_secret_property(prop)
                                                 else values.mask_url(text))
                continue
            if isinstance(value, SecretStr):
                shown = "********" if value.get_secret_value() else ""
            elif isinstance(value, str) and "://" in value:  # any URL: credentials masked
                shown = values.mask_url(value)
            elif isinstance(value, list):
                shown = ",".join(values.mask_url(str(item)) for item in value)
            else:
                shown = "" if value is None else str(value)
            out[ENV_PREFIX + name.upper()] = shown
        return out


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
