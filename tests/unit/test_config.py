"""consumer.config: defaults, then the TOML file, then PERKAMO_* env, then validation."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import ValidationError

from consumer.config import Settings, load_settings, setting_names
from consumer.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]

WriteSettings = Callable[[str], Path]


@pytest.fixture
def settings_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> WriteSettings:
    """Write a TOML settings file and point PERKAMO_SETTINGS_FILE at it."""

    def write(text: str) -> Path:
        path = tmp_path / "perkamo.toml"
        path.write_text(text)
        monkeypatch.setenv("PERKAMO_SETTINGS_FILE", str(path))
        return path

    return write


def config_error(**env: str) -> str:
    """The ConfigError message for these env settings."""
    mp = pytest.MonkeyPatch()
    try:
        for name, value in env.items():
            mp.setenv(name, value)
        with pytest.raises(ConfigError) as info:
            load_settings()
    finally:
        mp.undo()
    return str(info.value)


# Defaults (docs/configuration.md) ------------------------------------------------------


def test_defaults_match_the_design() -> None:
    settings = load_settings()
    assert settings.kafka_bootstrap_servers == "localhost:9092"
    assert settings.group_id == "perkamo-webhooks"
    assert settings.events_topics == ["perkamo.events"]
    assert settings.delivery_timeout_s == 5
    assert settings.retry_tiers == ["10s", "1m", "10m", "1h", "6h", "24h"]
    assert settings.admin_listen == "127.0.0.1:9464"
    assert settings.admin_host_port == ("127.0.0.1", 9464)
    assert settings.allow_private_networks == []
    assert settings.admin_token.get_secret_value() == ""
    assert settings.ca_bundle is None
    assert settings.endpoints_file is None


def test_default_history_dsn_is_chdb_under_the_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PERKAMO_DATA_DIR", str(tmp_path))
    assert load_settings().history_dsn_resolved == f"chdb://{tmp_path.resolve() / 'history'}"


def test_describe_defaults() -> None:
    described = load_settings().describe()
    assert described["PERKAMO_KAFKA_BOOTSTRAP_SERVERS"] == "localhost:9092"
    assert described["PERKAMO_GROUP_ID"] == "perkamo-webhooks"
    assert described["PERKAMO_RETRY_TIERS"] == "10s,1m,10m,1h,6h,24h"
    assert described["PERKAMO_ALLOW_PRIVATE_NETWORKS"] == ""
    assert described["PERKAMO_ADMIN_LISTEN"] == "127.0.0.1:9464"
    assert float(described["PERKAMO_DELIVERY_TIMEOUT_S"]) == 5
    assert set(described) == {name for name in setting_names() if name != "PERKAMO_SETTINGS_FILE"}


# Precedence ----------------------------------------------------------------------------


def test_file_overrides_defaults(settings_file: WriteSettings) -> None:
    settings_file('group_id = "from-file"\ndelivery_timeout_s = 7\nretry_tiers = ["1s", "2s"]\n')
    settings = load_settings()
    assert settings.group_id == "from-file"
    assert settings.delivery_timeout_s == 7
    assert settings.retry_tiers == ["1s", "2s"]
    assert settings.kafka_bootstrap_servers == "localhost:9092"  # untouched default


def test_env_overrides_file(settings_file: WriteSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    settings_file('group_id = "from-file"\ndelivery_timeout_s = 7\n')
    monkeypatch.setenv("PERKAMO_GROUP_ID", "from-env")
    settings = load_settings()
    assert settings.group_id == "from-env"
    assert settings.delivery_timeout_s == 7


def test_file_accepts_comma_string_for_lists(settings_file: WriteSettings) -> None:
    settings_file('events_topics = "a.events, b.events"\n')
    assert load_settings().events_topics == ["a.events", "b.events"]


@pytest.mark.parametrize(
    ("env", "value", "expected"),
    [
        (
            "PERKAMO_EVENTS_TOPICS",
            "perkamo.events,other.events",
            ["perkamo.events", "other.events"],
        ),
        ("PERKAMO_RETRY_TIERS", " 1s , 5s,, 1m ,", ["1s", "5s", "1m"]),
        ("PERKAMO_ALLOW_PRIVATE_NETWORKS", "127.0.0.0/8, ::1/128", ["127.0.0.0/8", "::1/128"]),
        ("PERKAMO_ALLOW_PRIVATE_NETWORKS", "", []),
    ],
)
def test_comma_lists_parse(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, expected: list[str]
) -> None:
    monkeypatch.setenv(env, value)
    settings = load_settings()
    assert getattr(settings, env.removeprefix("PERKAMO_").lower()) == expected


def test_tier_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERKAMO_RETRY_TIERS", "1s,2m")
    assert load_settings().tier_seconds == [("1s", 1.0), ("2m", 120.0)]


def test_existing_files_are_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setenv("PERKAMO_CA_BUNDLE", str(ca))
    assert load_settings().ca_bundle == ca


def test_ipv6_admin_listen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERKAMO_ADMIN_LISTEN", "[::1]:9464")
    assert load_settings().admin_host_port == ("::1", 9464)


# Bad values name the setting -----------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "value", "also"),
    [
        ("PERKAMO_DELIVERY_TIMEOUT_S", "abc", ""),
        ("PERKAMO_DELIVERY_TIMEOUT_S", "0", ""),
        ("PERKAMO_DELIVERY_TIMEOUT_S", "-1", ""),
        ("PERKAMO_DELIVERY_TIMEOUT_S", "301", ""),
        ("PERKAMO_RETRY_TIERS", "10s,5x,1h", "'5x'"),
        ("PERKAMO_RETRY_TIERS", "1m,10s", "shorter"),
        ("PERKAMO_ALLOW_PRIVATE_NETWORKS", "127.0.0.0/8,10.0.0.0/33", "'10.0.0.0/33'"),
        ("PERKAMO_ALLOW_PRIVATE_NETWORKS", "intranet", "'intranet'"),
        ("PERKAMO_ADMIN_LISTEN", "localhost", "HOST:PORT"),
        ("PERKAMO_ADMIN_LISTEN", "localhost:99999", "HOST:PORT"),
        ("PERKAMO_ADMIN_LISTEN", "localhost:http", "HOST:PORT"),
        ("PERKAMO_CA_BUNDLE", "/nonexistent/ca.pem", "/nonexistent/ca.pem"),
        ("PERKAMO_ENDPOINTS_FILE", "/nonexistent/endpoints.json", "/nonexistent/endpoints.json"),
        ("PERKAMO_EVENTS_TOPICS", " , ", ""),
        ("PERKAMO_LOG_LEVEL", "chatty", ""),
        ("PERKAMO_MAX_IN_FLIGHT", "0", ""),
    ],
)
def test_bad_value_names_the_setting(env: str, value: str, also: str) -> None:
    message = config_error(**{env: value})
    assert re.search(rf"\b{env}\b", message)
    assert also in message


@pytest.mark.parametrize("value", ["", ","])
def test_empty_retry_tiers_is_refused(value: str) -> None:
    message = config_error(PERKAMO_RETRY_TIERS=value)
    assert "PERKAMO_RETRY_TIERS" in message


def test_every_bad_setting_is_named_at_once() -> None:
    message = config_error(PERKAMO_DELIVERY_TIMEOUT_S="x", PERKAMO_ADMIN_LISTEN="nope")
    assert "PERKAMO_DELIVERY_TIMEOUT_S" in message
    assert "PERKAMO_ADMIN_LISTEN" in message


def test_unknown_key_in_toml_is_named(settings_file: WriteSettings) -> None:
    settings_file('group_id = "g"\nbogus_key = 1\n')
    with pytest.raises(ConfigError, match="PERKAMO_BOGUS_KEY"):
        load_settings()


def test_bad_value_in_toml_is_named(settings_file: WriteSettings) -> None:
    settings_file('delivery_timeout_s = "slow"\n')
    with pytest.raises(ConfigError, match="PERKAMO_DELIVERY_TIMEOUT_S"):
        load_settings()


def test_malformed_toml_names_the_settings_file(settings_file: WriteSettings) -> None:
    settings_file("group_id = \n")
    with pytest.raises(ConfigError, match="PERKAMO_SETTINGS_FILE"):
        load_settings()


def test_missing_settings_file_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERKAMO_SETTINGS_FILE", str(tmp_path / "typo.toml"))
    with pytest.raises(ConfigError, match="PERKAMO_SETTINGS_FILE"):
        load_settings()


def test_settings_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(ValidationError):
        settings.group_id = "other"


# describe() masks secrets --------------------------------------------------------------


def test_describe_masks_admin_token(monkeypatch: pytest.MonkeyPatch) -> None:
    token = "tok-9f8e7d6c-0123456789abcdef0123456789"
    monkeypatch.setenv("PERKAMO_ADMIN_TOKEN", token)
    settings = load_settings()
    assert settings.admin_token.get_secret_value() == token
    described = settings.describe()
    assert described["PERKAMO_ADMIN_TOKEN"] == "********"
    assert token not in repr(described)
    assert token not in repr(settings)


@pytest.mark.parametrize(
    ("env", "url", "shown"),
    [
        (
            "PERKAMO_HISTORY_DSN",
            "clickhouse://writer:dsn-pw-123@ch.internal:8123/perkamo",
            "clickhouse://********@ch.internal:8123/perkamo",
        ),
        (
            "PERKAMO_HTTPS_PROXY",
            "http://proxyuser:proxy-pw-456@proxy.internal:3128",
            "http://********@proxy.internal:3128",
        ),
        (
            "PERKAMO_HISTORY_DSN",
            "chdb:///var/lib/perkamo/history",
            "chdb:///var/lib/perkamo/history",
        ),
        ("PERKAMO_HTTPS_PROXY", "http://proxy.internal:3128", "http://proxy.internal:3128"),
    ],
)
def test_describe_masks_passwords_in_urls(
    monkeypatch: pytest.MonkeyPatch, env: str, url: str, shown: str
) -> None:
    monkeypatch.setenv(env, url)
    assert load_settings().describe()[env] == shown


def test_describe_masks_password_containing_at_sign(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERKAMO_HTTPS_PROXY", "http://user:p@ss-secret-tail@proxy.internal:3128")
    shown = load_settings().describe()["PERKAMO_HTTPS_PROXY"]
    assert "secret-tail" not in shown
    assert shown == "http://********@proxy.internal:3128"


def test_describe_masks_credentials_in_every_url(monkeypatch: pytest.MonkeyPatch) -> None:
    # Measured: `settings` printed PERKAMO_CONSOLE_URL's user:password@ as given.
    secrets = ("cons0le-pw", "ch-pw/with-slash", "tok-in-query", "sig-in-query", "oauth-pw",
               "proxy-pw")
    monkeypatch.setenv("PERKAMO_CONSOLE_URL", "https://ops:cons0le-pw@support.example.com/console/")
    monkeypatch.setenv("PERKAMO_HISTORY_DSN",
                       "https://writer:ch-pw/with-slash@ch.internal:8443/db?access_token=tok-in-query"
                       "&database=perkamo&X-Amz-Signature=sig-in-query#frag")
    monkeypatch.setenv("PERKAMO_HTTPS_PROXY", "http://u:proxy-pw@proxy.internal:3128")
    monkeypatch.setenv("PERKAMO_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL",
                       "https://client:oauth-pw@idp.example/token")
    monkeypatch.setenv("PERKAMO_KAFKA_CLIENT_RACK", "https://rack:oauth-pw@not-a-url-setting/")
    described = load_settings().describe()
    shown = "\n".join(f"{k}={v}" for k, v in described.items())
    for secret in secrets:
        assert secret not in shown, secret
    assert described["PERKAMO_CONSOLE_URL"] == "https://********@support.example.com/console/"
    assert described["PERKAMO_HISTORY_DSN"] == (
        "https://********@ch.internal:8443/db?access_token=********&database=perkamo"
        "&X-Amz-Signature=********#frag")
    assert described["PERKAMO_KAFKA_CLIENT_RACK"] == "https://********@not-a-url-setting/"


@pytest.mark.parametrize(("url", "shown"), [
    ("https://host/path?db=x&user=me", "https://host/path?db=x&user=me"),  # nothing secret
    ("https://host/?password=p&Password=q", "https://host/?password=********&Password=********"),
    ("https://host?apikey=k", "https://host?apikey=********"),
    ("https://host#token=k", "https://host#token=k"),  # a fragment is not a query
    ("https://a@b@host:1/p", "https://********@host:1/p"),
    ("https://host/p?x=1&flag&session_id=s", "https://host/p?x=1&flag&session_id=********"),
    ("chdb:///var/lib/perkamo/history", "chdb:///var/lib/perkamo/history"),
    ("not a url", "not a url"),
])
def test_mask_url(url: str, shown: str) -> None:
    from consumer.setting_values import mask_url

    assert mask_url(url) == shown


# The console secret: placeholders, length, a file ---------------------------------------

CONSOLE_SECRET = "c0nsole-" + "k" * 40


@pytest.mark.parametrize("secret", ["change-me", "CHANGE-ME", "changeme", "secret", "admin",
                                    "change-me-change-me-change-me-change-me",
                                    "CHANGE_ME_to_a_long_random_console_secret_value",
                                    "replace-me-0123456789abcdef0123456789abcdef"])
def test_console_secret_placeholders_are_refused_naming_the_setting(secret: str) -> None:
    with pytest.raises(ConfigError, match="PERKAMO_CONSOLE_SECRET is a placeholder"):
        load_settings(console_secret=secret)


def test_console_secret_length_at_the_limit() -> None:
    with pytest.raises(ConfigError, match="PERKAMO_CONSOLE_SECRET must be at least 32 characters "
                                          r"\(it has 31\)"):
        load_settings(console_secret="k" * 31)
    assert load_settings(console_secret="k" * 32).console_secret.get_secret_value() == "k" * 32
    assert load_settings(console_secret="").console_secret.get_secret_value() == ""
    with pytest.raises(ConfigError, match="PERKAMO_CONSOLE_SECRET must be printable"):
        load_settings(console_secret="k" * 32 + "\x00")


def test_console_secret_from_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "console-secret"
    path.write_text(CONSOLE_SECRET + "\n")
    settings = load_settings(console_secret_file=path)
    assert settings.console_secret.get_secret_value() == CONSOLE_SECRET
    assert CONSOLE_SECRET not in str(settings.describe())
    assert settings.describe()["PERKAMO_CONSOLE_SECRET"] == "********"
    monkeypatch.setenv("PERKAMO_CONSOLE_SECRET_FILE", str(path))
    assert load_settings().console_secret.get_secret_value() == CONSOLE_SECRET
    monkeypatch.setenv("PERKAMO_CONSOLE_SECRET", CONSOLE_SECRET)
    assert "PERKAMO_CONSOLE_SECRET and PERKAMO_CONSOLE_SECRET_FILE are both set" in config_error()
    monkeypatch.delenv("PERKAMO_CONSOLE_SECRET")
    placeholder = tmp_path / "placeholder"
    placeholder.write_text("change-me\n")
    monkeypatch.setenv("PERKAMO_CONSOLE_SECRET_FILE", str(placeholder))
    assert "PERKAMO_CONSOLE_SECRET is a placeholder" in config_error()
    monkeypatch.setenv("PERKAMO_CONSOLE_SECRET_FILE", str(tmp_path / "missing"))
    assert "PERKAMO_CONSOLE_SECRET_FILE: cannot read" in config_error()


# docs/configuration.md ------------------------------------------------------------------


def test_every_setting_is_documented_in_the_configuration_page() -> None:
    text = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    missing = [name for name in setting_names() if f"`{name}`" not in text]
    assert missing == [], f"settings not listed in docs/configuration.md: {missing}"


@pytest.mark.parametrize("name", ["PERKAMO_BREAKER_FAILURES", "PERKAMO_HISTORY_MAX_BUFFERED_ROWS"])
def test_removed_settings_are_refused_and_documented(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """The changelog and docs/configuration.md tell upgraders that start-up refuses these."""
    monkeypatch.setenv(name, "5")
    with pytest.raises(ConfigError, match=name):
        load_settings()
    text = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert f"`{name}`" in text


def test_setting_names_cover_every_field() -> None:
    names = setting_names()
    assert "PERKAMO_SETTINGS_FILE" in names
    # every field but `kafka` (PERKAMO_KAFKA_<NAME>, one name per librdkafka property)
    assert len(names) == len(Settings.model_fields) - 1 + 1
