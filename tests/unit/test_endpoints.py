"""consumer.endpoints: record validation, the static file and the registry.

See docs/architecture.md (endpoints).
"""

from __future__ import annotations

import base64
import logging
from pathlib import Path
from typing import Any

import orjson
import pytest

from consumer.endpoints import (
    REASON_INVALID_JSON,
    REASON_KEY_MISMATCH,
    REASON_SCHEMA,
    EndpointRegistry,
    endpoint_id_for,
    load_file,
    parse_record,
    record_of,
)
from consumer.errors import InvalidEndpoint
from consumer.models import Endpoint

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123").decode()


def record(space: str = "acme", url: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"space": space, "url": url or f"https://hooks.{space}.example/perkamo", **extra}


def value(space: str = "acme", url: str | None = None, **extra: Any) -> bytes:
    return orjson.dumps(record(space, url, **extra))


def registry_with(*endpoints: Endpoint) -> EndpointRegistry:
    return EndpointRegistry(endpoints)


# parse_record --------------------------------------------------------------------------


def test_parse_minimal_record() -> None:
    endpoint = parse_record(record())
    assert endpoint == Endpoint(
        id=endpoint_id_for("acme"), space="acme", url="https://hooks.acme.example/perkamo"
    )
    assert endpoint.active
    assert endpoint.host == "hooks.acme.example"


def test_parse_full_record() -> None:
    endpoint = parse_record(record(active=False, id="ep_custom-1", signing_secrets=[SECRET]))
    assert endpoint.id == "ep_custom-1"
    assert not endpoint.active
    assert endpoint.signing_secrets == (SECRET,)


@pytest.mark.parametrize(
    "url",
    [
        "http://hooks.acme.example/perkamo",
        "HTTP://hooks.acme.example/",
        "ftp://hooks.acme.example/",
        "hooks.acme.example/perkamo",
        "https://",
        "https:///path",
        "https://hooks.acme.example/a b",
    ],
)
def test_rejects_non_https_or_hostless_urls(url: str) -> None:
    with pytest.raises(InvalidEndpoint):
        parse_record(record(url=url))


@pytest.mark.parametrize(
    "url",
    [
        "https://user:hunter2pw@hooks.acme.example/",
        "https://hunter2pw@hooks.acme.example/",
        "https://user:hunter2pw@hooks.acme.example:8443/hook",
    ],
)
def test_rejects_credentials_in_url_without_echoing_them(url: str) -> None:
    with pytest.raises(InvalidEndpoint) as info:
        parse_record(record(url=url))
    assert "hunter2pw" not in str(info.value)


def test_rejects_unknown_fields() -> None:
    with pytest.raises(InvalidEndpoint):
        parse_record(record(event_types=["points.earned"]))


@pytest.mark.parametrize(
    "doc",
    [
        {"url": "https://hooks.example/"},
        {"space": "acme"},
        {"space": "Acme", "url": "https://hooks.example/"},
        {"space": "acme", "url": "https://hooks.example/", "active": "yes"},
        {"space": "acme", "url": "https://hooks.example/", "id": "custom"},
        {"space": "acme", "url": "https://hooks.example/" + "a" * 2048},
        [],
        "acme",
        None,
    ],
)
def test_rejects_schema_violations(doc: Any) -> None:
    with pytest.raises(InvalidEndpoint):
        parse_record(doc)


@pytest.mark.parametrize(
    "secret",
    [
        "nope_" + "A" * 20,  # wrong prefix
        "whsec_short",  # too short
        "whsec_" + "A" * 17,  # right alphabet, not valid base64 (length)
        "whsec_" + "A===" * 5,  # padding in the middle
        "whsec_!!!!!!!!!!!!!!!!!!!!",
    ],
)
def test_rejects_bad_signing_secret_without_echoing_it(secret: str) -> None:
    with pytest.raises(InvalidEndpoint) as info:
        parse_record(record(signing_secrets=[secret]))
    assert secret not in str(info.value)


def test_rejects_more_than_four_signing_secrets() -> None:
    with pytest.raises(InvalidEndpoint):
        parse_record(record(signing_secrets=[SECRET] * 5))


def test_default_id_is_stable_per_space() -> None:
    first = parse_record(record("acme"))
    again = parse_record(record("acme"))
    other = parse_record(record("globex"))
    assert first.id == again.id == endpoint_id_for("acme")
    assert first.id.startswith("ep_")
    assert other.id != first.id


def test_default_id_unchanged_when_the_url_changes() -> None:
    before = parse_record(record("acme", url="https://old.acme.example/hook"))
    after = parse_record(record("acme", url="https://new.acme.example/other"))
    assert before.id == after.id


def test_default_id_satisfies_the_schema() -> None:
    endpoint = parse_record(record("acme"))
    assert parse_record(record("acme", id=endpoint.id)).id == endpoint.id


@pytest.mark.parametrize(
    "endpoint",
    [
        Endpoint(id=endpoint_id_for("acme"), space="acme", url="https://h.example/x"),
        Endpoint(
            id="ep_custom",
            space="acme",
            url="https://h.example/x",
            active=False,
            signing_secrets=(SECRET,),
        ),
    ],
)
def test_record_of_round_trips(endpoint: Endpoint) -> None:
    assert parse_record(record_of(endpoint)) == endpoint


@pytest.mark.parametrize("url", ["https://[oops/hook", "https://hooks]example/", "https://[::1/"])
def test_malformed_host_is_invalid_endpoint(url: str) -> None:
    with pytest.raises(InvalidEndpoint):
        parse_record(record(url=url))


# load_file -----------------------------------------------------------------------------


def write_json(tmp_path: Path, doc: Any) -> Path:
    path = tmp_path / "endpoints.json"
    path.write_bytes(orjson.dumps(doc))
    return path


def test_load_file(tmp_path: Path) -> None:
    path = write_json(tmp_path, [record("acme"), record("globex", active=False)])
    assert [ep.space for ep in load_file(path)] == ["acme", "globex"]


def test_load_file_names_the_bad_record_index(tmp_path: Path) -> None:
    path = write_json(
        tmp_path, [record("acme"), record("globex"), record("initech", url="http://x.example/")]
    )
    with pytest.raises(InvalidEndpoint, match=r"record 2\b") as info:
        load_file(path)
    assert "PERKAMO_ENDPOINTS_FILE" in str(info.value)


@pytest.mark.parametrize("content", [b"{not json", b'{"space": "acme"}', b""])
def test_load_file_rejects_non_list_or_invalid_json(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "endpoints.json"
    path.write_bytes(content)
    with pytest.raises(InvalidEndpoint, match="PERKAMO_ENDPOINTS_FILE"):
        load_file(path)


def test_load_file_missing(tmp_path: Path) -> None:
    with pytest.raises(InvalidEndpoint, match="PERKAMO_ENDPOINTS_FILE"):
        load_file(tmp_path / "absent.json")


def test_load_file_names_index_for_malformed_host(tmp_path: Path) -> None:
    path = write_json(tmp_path, [record("acme"), record("globex", url="https://[oops/hook")])
    with pytest.raises(InvalidEndpoint, match=r"record 1\b"):
        load_file(path)


# EndpointRegistry ----------------------------------------------------------------------


def test_file_record_applies_without_topic() -> None:
    registry = registry_with(parse_record(record("acme")))
    endpoint = registry.get("acme")
    assert endpoint is not None
    assert endpoint.url == "https://hooks.acme.example/perkamo"
    assert registry.get("globex") is None


def test_topic_record_overrides_file() -> None:
    registry = registry_with(parse_record(record("acme", url="https://file.example/hook")))
    assert registry.apply(b"acme", value("acme", url="https://topic.example/hook")) is None
    endpoint = registry.get("acme")
    assert endpoint is not None
    assert endpoint.url == "https://topic.example/hook"
    assert [ep.url for ep in registry.all()] == ["https://topic.example/hook"]


def test_tombstone_restores_the_files_record() -> None:
    registry = registry_with(parse_record(record("acme", url="https://file.example/hook")))
    registry.apply(b"acme", value("acme", url="https://topic.example/hook"))
    assert registry.apply(b"acme", None) is None
    endpoint = registry.get("acme")
    assert endpoint is not None
    assert endpoint.url == "https://file.example/hook"


def test_tombstone_without_file_record_removes_the_space() -> None:
    registry = registry_with()
    registry.apply(b"acme", value("acme"))
    registry.apply(b"acme", None)
    assert registry.get("acme") is None
    assert registry.all() == []


def test_inactive_record_means_no_endpoint() -> None:
    registry = registry_with(parse_record(record("acme")))
    registry.apply(b"acme", value("acme", active=False))
    assert registry.get("acme") is None
    assert [ep.active for ep in registry.all()] == [False]
    assert registry.active_count() == 0


def test_later_record_replaces_earlier() -> None:
    registry = registry_with()
    registry.apply(b"acme", value("acme", url="https://one.example/"))
    registry.apply(b"acme", value("acme", url="https://two.example/"))
    endpoint = registry.get("acme")
    assert endpoint is not None
    assert endpoint.url == "https://two.example/"


def test_key_space_mismatch_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    registry = registry_with()
    registry.apply(b"acme", value("acme", url="https://acme.example/"))
    with caplog.at_level(logging.WARNING, logger="consumer.endpoints"):
        reason = registry.apply(b"acme", value("globex", url="https://globex.example/secret-path"))
    assert reason == REASON_KEY_MISMATCH
    assert registry.get("globex") is None
    # The newest record under key acme is invalid: acme has no topic record any more, as it
    # will not after compaction either.
    assert registry.get("acme") is None
    assert "secret-path" not in caplog.text


@pytest.mark.parametrize("bad", [b"{not json", b"", b"\xff\xfe"])
def test_invalid_json_is_ignored_with_reason(bad: bytes) -> None:
    registry = registry_with()
    registry.apply(b"acme", value("acme"))
    assert registry.apply(b"acme", bad) == REASON_INVALID_JSON
    assert registry.get("acme") is None  # newest record wins, as after compaction


def test_schema_violation_is_ignored_with_reason(caplog: pytest.LogCaptureFixture) -> None:
    registry = registry_with()
    with caplog.at_level(logging.WARNING, logger="consumer.endpoints"):
        reason = registry.apply(b"acme", value("acme", url="http://acme.example/secret-path"))
    assert reason == REASON_SCHEMA
    assert registry.get("acme") is None
    assert "secret-path" not in caplog.text


def test_malformed_host_on_topic_is_ignored_with_reason() -> None:
    registry = registry_with()
    assert registry.apply(b"acme", value("acme", url="https://[oops/hook")) == REASON_SCHEMA


def test_all_merges_sources_sorted_by_space() -> None:
    registry = registry_with(parse_record(record("zeta")), parse_record(record("acme")))
    registry.apply(b"mid", value("mid"))
    assert [ep.space for ep in registry.all()] == ["acme", "mid", "zeta"]
    assert registry.active_count() == 3
