"""Issue 13, item 3: any librdkafka property through PERKAMO_KAFKA_<NAME> or a [kafka] table,
applied to every client, secrets masked; tested on a REAL broker with a SASL_SSL listener
(SCRAM-SHA-512 over TLS, a trustme CA), started by deploy/kafka/kafka.sh. ClickHouse server
credentials and TLS are checked on the client arguments built (no server runs here).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import trustme
from confluent_kafka import Producer
from cryptography.hazmat.primitives import serialization

from consumer import kafka_io, kafka_topics
from consumer.config import load_settings
from consumer.constants import ENDPOINTS_TOPIC
from consumer.errors import ConfigError, KafkaFailure
from consumer.history import TABLE, HistoryStore, client_kwargs, mask_dsn
from consumer.kafka_reader import read_all, reader_config
from consumer.topics import plan
from tests.conftest import KAFKA_SCRIPT, LOOPBACK, start_roles, stop_roles
from tests.support import free_port, make_event, unique, wait_for

USER, PASSWORD = "alice", "alice-pa55-" + "s3cr3t"


@pytest.fixture(scope="module")
def sasl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A second real broker with a SASL_SSL listener (SCRAM-SHA-512 user alice, test CA)."""
    folder = tmp_path_factory.mktemp("kafka-sasl")
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    cert = ca.issue_cert("127.0.0.1", "localhost")
    key = serialization.load_pem_private_key(cert.private_key_pem.bytes(), None)
    pkcs8 = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption())
    keystore = folder / "broker.pem"
    keystore.write_bytes(pkcs8 + b"".join(pem.bytes() for pem in cert.cert_chain_pems))
    ca_file = folder / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    sasl_port = free_port()
    env = {
        **os.environ,
        "KAFKA_PORT": str(free_port()),
        "KAFKA_CONTROLLER_PORT": str(free_port()),
        "KAFKA_SASL_PORT": str(sasl_port),
        "KAFKA_TLS_KEYSTORE": str(keystore),
        "KAFKA_SCRAM_USERS": f"{USER}:{PASSWORD}",
        "KAFKA_DIR": str(folder / "broker"),
        "KAFKA_HEAP": "256m",
    }
    subprocess.run([str(KAFKA_SCRIPT), "start"], env=env, check=True)
    try:
        yield {
            "bootstrap": f"127.0.0.1:{sasl_port}",
            "ca": ca_file,
            "env": {
                "PERKAMO_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{sasl_port}",
                "PERKAMO_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                "PERKAMO_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
                "PERKAMO_KAFKA_SASL_USERNAME": USER,
                "PERKAMO_KAFKA_SASL_PASSWORD": PASSWORD,
                "PERKAMO_KAFKA_SSL_CA_LOCATION": str(ca_file),
            },
        }
    finally:
        subprocess.run([str(KAFKA_SCRIPT), "stop"], env=env, check=False)


def secured(broker: dict[str, Any], password: str = PASSWORD) -> dict[str, str]:
    return {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
            "sasl.username": USER, "sasl.password": password, "ssl.ca.location": str(broker["ca"])}


# --- settings ---------------------------------------------------------------------------------


def test_environment_names_become_librdkafka_properties(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERKAMO_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("PERKAMO_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("PERKAMO_KAFKA_SASL_USERNAME", "svc")
    monkeypatch.setenv("PERKAMO_KAFKA_SASL_PASSWORD", "pw-123")
    monkeypatch.setenv("PERKAMO_KAFKA_SSL_CA_LOCATION", "/etc/ca.pem")
    monkeypatch.setenv("PERKAMO_KAFKA_BOOTSTRAP_SERVERS", "broker:9093")
    settings = load_settings()
    assert settings.kafka_bootstrap_servers == "broker:9093"  # still a setting of its own
    assert settings.kafka == {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512",
                              "sasl.username": "svc", "sasl.password": "pw-123",
                              "ssl.ca.location": "/etc/ca.pem"}
    assert kafka_io.client_config(settings) == {"bootstrap.servers": "broker:9093", **settings.kafka}


def test_a_kafka_table_in_the_settings_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "settings.toml"
    path.write_text('[kafka]\n"security.protocol" = "SSL"\n"socket.keepalive.enable" = true\n'
                    '"message.max.bytes" = 2000000\n"sasl.username" = "from-file"\n')
    monkeypatch.setenv("PERKAMO_SETTINGS_FILE", str(path))
    monkeypatch.setenv("PERKAMO_KAFKA_SASL_USERNAME", "from-env")  # the environment wins
    settings = load_settings()
    assert settings.kafka == {"security.protocol": "SSL", "socket.keepalive.enable": "true",
                              "message.max.bytes": "2000000", "sasl.username": "from-env"}


def test_secret_properties_are_masked_and_can_come_from_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "sasl-password"
    secret.write_text("file-pa55\n")
    monkeypatch.setenv("PERKAMO_KAFKA_SASL_PASSWORD_FILE", str(secret))
    monkeypatch.setenv("PERKAMO_KAFKA_SSL_KEY_PASSWORD", "key-pa55")
    monkeypatch.setenv("PERKAMO_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET", "oauth-pa55")
    monkeypatch.setenv("PERKAMO_KAFKA_SSL_KEY_PEM", "-----BEGIN PRIVATE KEY-----x")
    monkeypatch.setenv("PERKAMO_KAFKA_SASL_USERNAME", "visible-user")
    settings = load_settings()
    assert settings.kafka["sasl.password"] == "file-pa55"
    described = settings.describe()
    for name in ("PERKAMO_KAFKA_SASL_PASSWORD", "PERKAMO_KAFKA_SSL_KEY_PASSWORD",
                 "PERKAMO_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET", "PERKAMO_KAFKA_SSL_KEY_PEM"):
        assert described[name] == "********", name
    assert described["PERKAMO_KAFKA_SASL_USERNAME"] == "visible-user"
    text = repr(described) + repr(kafka_io.describe_config(kafka_io.client_config(settings)))
    for value in ("file-pa55", "key-pa55", "oauth-pa55", "BEGIN PRIVATE KEY"):
        assert value not in text


@pytest.mark.parametrize(("env", "words"), [
    ({"PERKAMO_KAFKA_ENABLE_AUTO_COMMIT": "true"},
     "PERKAMO_KAFKA_ENABLE_AUTO_COMMIT: enable.auto.commit is set by the service"),
    ({"PERKAMO_KAFKA_ACKS": "1"}, "PERKAMO_KAFKA_ACKS"),
    ({"PERKAMO_KAFKA_GROUP_ID": "other"}, "use PERKAMO_GROUP_ID"),
    ({"PERKAMO_KAFKA_SASL_PASSWORD_FILE": "/nonexistent/pw"},
     "PERKAMO_KAFKA_SASL_PASSWORD_FILE: cannot read"),
])
def test_bad_kafka_settings_name_the_setting(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], words: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=words):
        load_settings()


def test_an_unknown_property_is_refused_naming_the_setting() -> None:
    settings = load_settings(kafka={"sasl.pasword": "typo-pa55"})
    with pytest.raises(ConfigError) as caught:
        kafka_io.AsyncProducer(settings)
    assert "PERKAMO_KAFKA_SASL_PASWORD" in str(caught.value)
    assert "typo-pa55" not in str(caught.value)


def test_every_client_config_starts_from_the_settings() -> None:
    settings = load_settings(kafka_bootstrap_servers="b:1", kafka={"security.protocol": "SSL"})
    configs = [
        kafka_io.consumer_config(settings, "g", "consumer"),
        kafka_io.producer_config(settings),
        reader_config(settings),
        kafka_io.client_config(settings),
    ]
    for config in configs:
        assert config["bootstrap.servers"] == "b:1" and config["security.protocol"] == "SSL"
    # Callers that only hold the bootstrap string (the delivery loop) get the same properties.
    kafka_io.use_settings(settings)
    assert kafka_io.consumer_config("b:1", "g", "consumer")["security.protocol"] == "SSL"
    assert kafka_io.producer_config("b:1")["security.protocol"] == "SSL"
    assert "security.protocol" not in kafka_io.producer_config("other:1")


def test_no_client_is_made_without_the_common_config() -> None:
    # Every Consumer(/Producer(/AdminClient( in consumer/ goes through kafka_io.make_client or a
    # *_config() built on client_config(); service.py keeps its two calls on consumer_config /
    # AsyncProducer, which read the properties registered for its bootstrap string.
    import re

    root = Path(__file__).resolve().parent.parent / "consumer"
    direct = []
    for path in sorted(root.glob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\b(Consumer|Producer|AdminClient)\(\{", line):
                direct.append(f"{path.name}:{number}: {line.strip()}")
    assert direct == [], direct


# --- the real SASL_SSL broker -----------------------------------------------------------------


def test_cli_commands_work_through_the_secured_listener(sasl_broker: dict[str, Any], tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERKAMO_")}
    env.update(sasl_broker["env"])
    env["PERKAMO_RETRY_TIERS"] = "1s,2s"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "consumer", *args], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120, check=False)

    topics = cli("topics", "--partitions", "1")
    assert topics.returncode == 0, topics.stderr
    space = unique("sasl-cli")
    result = cli("endpoints", "set", "--space", space, "--url", "https://hooks.example.com/h")
    assert result.returncode == 0, result.stderr
    listed = cli("endpoints", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert space in {row["space"] for row in orjson.loads(listed.stdout)}
    settings = cli("settings")
    assert "PERKAMO_KAFKA_SASL_PASSWORD=********" in settings.stdout
    for output in (topics, result, listed, settings):
        assert PASSWORD not in output.stdout + output.stderr


async def test_events_are_delivered_end_to_end_through_sasl_ssl(
    sasl_broker: dict[str, Any], store: HistoryStore, receiver: Any, ca_file: Path, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    space = unique("sasl")
    events_topic = unique("perkamo.events.sasl")
    endpoints = tmp_path / "endpoints.json"
    endpoints.write_bytes(orjson.dumps([{"space": space, "url": receiver.url("/sasl")}]))
    settings = load_settings(
        kafka_bootstrap_servers=sasl_broker["bootstrap"], kafka=secured(sasl_broker),
        events_topics=[events_topic], group_id=unique("sasl-group"), data_dir=tmp_path,
        retry_tiers=["1s", "2s"], allow_private_networks=LOOPBACK, ca_bundle=ca_file,
        admin_listen=f"127.0.0.1:{free_port()}", deliver_admin_listen=f"127.0.0.1:{free_port()}",
        history_group_id=unique("sasl-history"), endpoints_file=endpoints,
        history_flush_interval_s=0.2, commit_interval_s=0.2, drain_timeout_s=5.0,
    )
    specs, _ = plan(settings, partitions=2, retention_hours=None)
    await asyncio.to_thread(kafka_topics.ensure_topics, settings,
                            [(s.name, s.partitions, s.config) for s in specs])
    # Both roles, each of their clients (consumers, producers, the registry followers) over
    # the secured listener.
    app = await asyncio.wait_for(start_roles(settings, store), 90)
    try:
        producer = Producer({**kafka_io.client_config(settings), "enable.idempotence": True})
        events = [make_event(space) for _ in range(3)]
        for event in events:
            producer.produce(events_topic, orjson.dumps(event))
        assert producer.flush(30) == 0
        await wait_for(lambda: len(receiver.to("/sasl")) >= 3, timeout=60, what="deliveries")
        ids = [e["id"] for e in events]

        def rows() -> Any:
            _, found = store.query(f"SELECT count() FROM {TABLE} FINAL WHERE event_id IN "
                                   "{ids:Array(String)} AND status = 'delivered'", {"ids": ids})
            return found[0][0] == 3

        await wait_for(rows, timeout=30, what="history rows")
        # The registry follower read its topic through the same secured listener.
        assert app.registry.loaded
        assert read_all(settings, ENDPOINTS_TOPIC, 30) is not None
    finally:
        with contextlib.suppress(Exception):
            await stop_roles(app)
    for record in caplog.records:
        assert PASSWORD not in record.getMessage()


def test_a_wrong_password_fails_start_up_naming_the_setting(
    sasl_broker: dict[str, Any], tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERKAMO_")}
    env.update(sasl_broker["env"])
    env.update({"PERKAMO_KAFKA_SASL_PASSWORD": "wrong-pa55-word", "PERKAMO_DATA_DIR": str(tmp_path),
                "PERKAMO_ADMIN_LISTEN": f"127.0.0.1:{free_port()}"})
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "consumer", "run"], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60, check=False)
    took = time.monotonic() - started
    assert result.returncode != 0
    assert "PERKAMO_KAFKA_SASL_PASSWORD" in result.stderr, result.stderr
    assert "wrong-pa55-word" not in result.stdout + result.stderr
    assert took < 25, f"start-up took {took:.0f}s to notice the refused credentials"


def test_wait_for_broker_names_the_setting_within_seconds(sasl_broker: dict[str, Any]) -> None:
    settings = load_settings(kafka_bootstrap_servers=sasl_broker["bootstrap"],
                             kafka=secured(sasl_broker, password="nope-nope"))
    started = time.monotonic()
    with pytest.raises(KafkaFailure, match="PERKAMO_KAFKA_SASL_PASSWORD") as caught:
        kafka_topics.wait_for_broker(settings, 30)
    assert time.monotonic() - started < 10
    assert "nope-nope" not in str(caught.value)



def test_an_untrusted_broker_certificate_names_the_ca_setting(
    sasl_broker: dict[str, Any], tmp_path: Path
) -> None:
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    settings = load_settings(kafka_bootstrap_servers=sasl_broker["bootstrap"],
                             kafka={**secured(sasl_broker), "ssl.ca.location": str(other_ca)})
    started = time.monotonic()
    with pytest.raises(KafkaFailure, match="PERKAMO_KAFKA_SSL_CA_LOCATION"):
        kafka_topics.wait_for_broker(settings, 20)
    assert time.monotonic() - started < 10


# --- ClickHouse server credentials and TLS (client arguments; no server here) ------------------


def test_clickhouse_client_arguments_carry_password_and_ca(tmp_path: Path) -> None:
    ca = tmp_path / "ch-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    settings = load_settings(history_dsn="https://perkamo@ch.internal:8443/perkamo",
                             history_password="ch-pa55", history_ca_bundle=ca)
    kwargs = client_kwargs(settings.history_dsn_resolved, settings.history_password_value,
                           str(settings.history_ca_bundle))
    assert kwargs == {"dsn": "https://perkamo@ch.internal:8443/perkamo", "password": "ch-pa55",
                      "ca_cert": str(ca), "verify": True}
    assert client_kwargs("chdb:///tmp/x", "ignored", str(ca)) == {"dsn": "chdb:///tmp/x"}
    described = settings.describe()
    assert described["PERKAMO_HISTORY_PASSWORD"] == "********"
    assert "ch-pa55" not in repr(described) and "ch-pa55" not in repr(settings)


def test_clickhouse_password_from_a_file_and_in_one_place_only(tmp_path: Path) -> None:
    secret = tmp_path / "ch-password"
    secret.write_text("file-ch-pa55\n")
    settings = load_settings(history_dsn="https://u@ch:8443", history_password_file=secret)
    assert settings.history_password_value == "file-ch-pa55"
    with pytest.raises(ConfigError, match="PERKAMO_HISTORY_PASSWORD is set and PERKAMO_HISTORY_DSN"):
        load_settings(history_dsn="https://u:dsn-pa55@ch:8443", history_password="x")


def test_the_dsn_password_is_masked_everywhere(caplog: pytest.LogCaptureFixture) -> None:
    dsn = "https://chuser:dsn-pa55@127.0.0.1:9/perkamo"
    assert mask_dsn(dsn) == "https://chuser:********@127.0.0.1:9/perkamo"
    assert "dsn-pa55" not in load_settings(history_dsn=dsn).describe()["PERKAMO_HISTORY_DSN"]
    caplog.set_level(logging.DEBUG)
    with pytest.raises(Exception) as caught:  # nothing listens on port 9: the store says so
        HistoryStore(dsn, query_timeout_s=1)
    assert "dsn-pa55" not in str(caught.value)
    assert all("dsn-pa55" not in r.getMessage() for r in caplog.records)
