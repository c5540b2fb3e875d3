"""Settings: defaults, then a TOML file, then PERKAMO_* environment variables, then one validation pass.

Every setting is documented in README.md with its default; `Settings.describe()` is the
masked dump operators see from `perkamo-webhooks settings`.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
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


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """All settings of the service. Field `x` is read from env `PERKAMO_X` or key `x` in the file."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", frozen=True)

    kafka_bootstrap_servers: str = "localhost:9092"
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
    endpoints_file: Path | None = None
    delivery_timeout_s: float = Field(5.0, gt=0, le=300)
    retry_tiers: CommaList = Field(default_factory=lambda: ["10s", "1m", "10m", "1h", "6h", "24h"])
    allow_private_networks: CommaList = Field(default_factory=list)
    ca_bundle: Path | None = None
    https_proxy: str = ""
    admin_listen: str = "127.0.0.1:9464"  # the history role (and `all`): history API, console
    # The deliver role's /metrics and probes; worker i of `--workers N` listens on port + i.
    deliver_admin_listen: str = "127.0.0.1:9465"
    admin_token: SecretStr = SecretStr("")
    # The delivery console (/console/ on the admin listener). Its signing key comes from
    # console_secret, or from admin_token (HKDF) when that is empty.
    console_secret: SecretStr = SecretStr("")
    console_session_ttl: str = "8h"
    console_url: str = ""  # empty: http://<admin listen>/console/
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

    @field_validator("events_topics", "retry_tiers", "allow_private_networks", mode="before")
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

    @field_validator("ca_bundle", "endpoints_file")
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
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
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

    def describe(self) -> dict[str, str]:
        """Every setting as its env name and value, with secrets masked."""
        out: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
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
    """The environment names of every setting (PERKAMO_SETTINGS_FILE included)."""
    return [ENV_PREFIX + name.upper() for name in Settings.model_fields] + [SETTINGS_FILE_ENV]


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
            if not err["loc"]:  # a rule across settings names them in its message
                problems.append(err["msg"].removeprefix("Value error, "))
                continue
            field = ".".join(str(part) for part in err["loc"])
            name = ENV_PREFIX + field.split(".")[0].upper()
            problems.append(f"{name}: {err['msg']}")
        raise ConfigError("invalid settings: " + "; ".join(problems)) from None
    except (OSError, ValueError) as exc:  # unreadable or malformed TOML file
        raise ConfigError(f"{SETTINGS_FILE_ENV}: {exc}") from None
