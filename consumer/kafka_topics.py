"""The Kafka wrapper's admin side: topics (create, keep their budget and replication settings
in step, read their configs) and whether the broker answers at all. Nothing here knows what
the topics carry (consumer.topics plans them, consumer.topic_check judges them)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # the stubs omit re-exports
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
)

from consumer.errors import KafkaFailure, KafkaRefused
from consumer.kafka_io import Source, bootstrap_of, client_config, make_client, scrub

_AUTH_ERRORS = frozenset({KafkaError._AUTHENTICATION, KafkaError._SSL,
                          KafkaError.SASL_AUTHENTICATION_FAILED})


def topic_names(source: Source, timeout: float) -> set[str]:
    """The cluster's topics; KafkaFailure when the broker does not answer in time."""
    try:
        return set(admin_client(source).list_topics(timeout=timeout).topics)
    except KafkaException as exc:
        raise KafkaFailure(f"broker {bootstrap_of(source)} did not answer: {exc}") from None


def admin_client(source: Source) -> AdminClient:
    """An AdminClient with the settings' properties."""
    client: AdminClient = make_client(AdminClient, client_config(source))
    return client


# Kept in step on existing topics too: the size budget and the write durability depend on them.
KEPT_IN_STEP = ("max.message.bytes", "min.insync.replicas")


def ensure_topics(
    source: Source,
    topics: Sequence[tuple[str, int, dict[str, str]]],
    replication_factor: int = 1,
    timeout: float = 30.0,
) -> list[str]:
    """Create topics that do not exist (name, partitions, config); returns the ones created.

    On topics that exist, the KEPT_IN_STEP keys of their config are set where the broker's
    value differs (an incremental alter: nothing else changes). `min.insync.replicas` is
    capped at each topic's replica count (a topic cannot have more in-sync replicas)."""
    admin = admin_client(source)
    meta = admin.list_topics(timeout=timeout).topics
    wanted = [
        NewTopic(name, num_partitions=parts, replication_factor=replication_factor,
                 config=_capped(cfg, replication_factor))
        for name, parts, cfg in topics
        if name not in meta
    ]
    created = []
    if wanted:
        for name, fut in admin.create_topics(wanted, operation_timeout=timeout).items():
            try:
                fut.result(timeout)
                created.append(name)
            except KafkaException as exc:
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise KafkaFailure(f"cannot create topic {name}: {exc}") from None
        _wait_for_leaders(admin, [name for name, _, _ in topics], timeout)
        meta = admin.list_topics(timeout=timeout).topics  # another client may have won a race
    # Every topic asked for (the new ones too: their config must be what the brokers report).
    kept = {name: _capped(cfg, _replicas(meta[name])) for name, _, cfg in topics
            if name in meta and any(k in cfg for k in KEPT_IN_STEP)}
    _keep_in_step(admin, kept, timeout)
    return created


def _replicas(topic_meta: Any) -> int:
    return max((len(p.replicas) for p in topic_meta.partitions.values()), default=1)


def _capped(config: dict[str, str], replicas: int) -> dict[str, str]:
    if "min.insync.replicas" not in config:
        return config
    return {**config, "min.insync.replicas": str(min(int(config["min.insync.replicas"]), max(1, replicas)))}


def _keep_in_step(admin: AdminClient, wanted: dict[str, dict[str, str]], timeout: float) -> None:
    """Set the KEPT_IN_STEP keys of these topics where the broker's value differs, then wait
    until the brokers report them: on a cluster a broker may answer with the old value for a
    moment, and a role started right after `topics` must not read that."""
    wanted = {name: {k: v for k, v in cfg.items() if k in KEPT_IN_STEP} for name, cfg in wanted.items()}
    differ = _differences(admin, wanted, timeout)
    if differ:
        changes = [
            ConfigResource(ConfigResource.Type.TOPIC, name, incremental_configs=[
                ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET) for k, v in keys.items()])
            for name, keys in differ.items()
        ]
        for resource, fut in admin.incremental_alter_configs(changes, request_timeout=timeout).items():
            try:
                fut.result(timeout)
            except KafkaException as exc:
                raise KafkaFailure(f"cannot change the config of topic {resource.name}: {exc}") from None
    deadline = time.monotonic() + timeout
    while differ:
        time.sleep(0.2)
        differ = _differences(admin, differ, timeout)
        if differ and time.monotonic() > deadline:
            keys = sorted({k for changed in differ.values() for k in changed})
            raise KafkaFailure(f"topics {', '.join(sorted(differ))}: the brokers still report the old "
                               f"{', '.join(keys)} after {timeout:.0f}s; try again")


def _differences(
    admin: AdminClient, wanted: dict[str, dict[str, str]], timeout: float
) -> dict[str, dict[str, str]]:
    """Per topic, the wanted keys whose value the broker reports otherwise (a topic it does not
    know yet counts as all of them)."""
    if not wanted:
        return {}
    resources = [ConfigResource(ConfigResource.Type.TOPIC, name) for name in wanted]
    out: dict[str, dict[str, str]] = {}
    for resource, fut in admin.describe_configs(resources, request_timeout=timeout).items():
        try:
            current = {k: v.value for k, v in fut.result(timeout).items()}
        except KafkaException:
            current = {}
        keys = {k: v for k, v in wanted[resource.name].items() if current.get(k) != v}
        if keys:
            out[resource.name] = keys
    return out


def _wait_for_leaders(admin: AdminClient, names: Sequence[str], timeout: float) -> None:
    """A new topic answers NOT_LEADER until its partitions have leaders; wait for that."""
    deadline = time.monotonic() + timeout
    while True:
        meta = admin.list_topics(timeout=timeout).topics
        if all(
            name in meta
            and meta[name].partitions
            and all(p.leader >= 0 for p in meta[name].partitions.values())
            for name in names
        ):
            return
        if time.monotonic() > deadline:
            raise KafkaFailure(f"topics {', '.join(names)} have no leaders after {timeout:.0f}s")
        time.sleep(0.1)


def topic_configs(source: Source, names: Sequence[str], timeout: float = 15.0) -> dict[str, dict[str, str]]:
    """Current configs of existing topics (used to warn about too-short retention)."""
    admin = admin_client(source)
    resources = [ConfigResource(ConfigResource.Type.TOPIC, name) for name in names]
    out: dict[str, dict[str, str]] = {}
    for resource, fut in admin.describe_configs(resources, request_timeout=timeout).items():
        try:
            out[resource.name] = {k: v.value for k, v in fut.result(timeout).items()}
        except KafkaException:
            continue
    return out


def wait_for_broker(source: Source, timeout: float) -> None:
    """Block until the broker answers a metadata request.

    librdkafka reports refused credentials and TLS failures as error events, not as an
    exception of the metadata call (which would just time out), so an error callback latches
    them and the wait ends at once with a message naming the settings to fix."""
    bootstrap = bootstrap_of(source)
    problems: list[KafkaError] = []

    def on_error(err: KafkaError) -> None:
        if err.code() in _AUTH_ERRORS or "SSL handshake failed" in err.str():
            problems.append(err)

    config = {**client_config(source), "error_cb": on_error}
    admin: AdminClient = make_client(AdminClient, config)
    deadline = time.monotonic() + timeout
    while True:
        try:
            admin.list_topics(timeout=min(1.0, max(0.1, deadline - time.monotonic())))
            return
        except KafkaException as exc:
            admin.poll(0)  # serve error events
            if problems:
                raise KafkaRefused(_auth_failure(problems[0], config)) from None
            if time.monotonic() >= deadline:
                raise KafkaFailure(f"broker {bootstrap} not reachable within {timeout:.0f}s: "
                                 f"{scrub(str(exc), config)}") from None


def _auth_failure(err: KafkaError, config: dict[str, Any]) -> str:
    """Refused credentials or TLS as a sentence naming the settings to check."""
    text = scrub(err.str(), config)
    if err.code() == KafkaError._SSL or "SSL handshake failed" in text:
        return (f"Kafka TLS handshake failed ({text}): check PERKAMO_KAFKA_SSL_CA_LOCATION and "
                "PERKAMO_KAFKA_SECURITY_PROTOCOL")
    return (f"Kafka refused the credentials ({text}): check PERKAMO_KAFKA_SASL_USERNAME and "
            "PERKAMO_KAFKA_SASL_PASSWORD (and PERKAMO_KAFKA_SASL_MECHANISM)")
