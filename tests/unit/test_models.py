"""consumer.models: stable ids and an Endpoint that never shows its URL."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.models import Endpoint, delivery_id_for, stable_id

SECRET_URL = "https://hooks.acme.example/t/9f2c-secret-token?sig=abc"


def test_delivery_id_is_deterministic() -> None:
    assert delivery_id_for("evt_1", "ep_a") == delivery_id_for("evt_1", "ep_a")
    # A known value: changing the derivation changes every receiver's idempotency key.
    assert delivery_id_for("evt_1", "ep_a") == stable_id("dlv", "evt_1", "ep_a")


def test_delivery_id_shape() -> None:
    delivery_id = delivery_id_for("evt_1", "ep_a")
    assert delivery_id.startswith("dlv_")
    assert len(delivery_id) == len("dlv_") + 26
    assert delivery_id == delivery_id.lower()


def test_delivery_id_distinct_per_endpoint_and_event() -> None:
    ids = {
        delivery_id_for("evt_1", "ep_a"),
        delivery_id_for("evt_1", "ep_b"),
        delivery_id_for("evt_2", "ep_a"),
    }
    assert len(ids) == 3


def test_delivery_id_parts_are_not_ambiguous() -> None:
    assert delivery_id_for("evt_1", "2ep") != delivery_id_for("evt_12", "ep")


@settings(max_examples=200, deadline=None)
@given(
    st.text(min_size=1, max_size=40),
    st.text(min_size=1, max_size=40),
    st.text(min_size=1, max_size=40),
)
def test_delivery_id_distinct_endpoints_property(event_id: str, ep_a: str, ep_b: str) -> None:
    if "\x00" in event_id + ep_a + ep_b:
        return  # the separator; ids never contain it (schema patterns)
    same = delivery_id_for(event_id, ep_a) == delivery_id_for(event_id, ep_b)
    assert same == (ep_a == ep_b)


@pytest.fixture
def endpoint() -> Endpoint:
    return Endpoint(
        id="ep_abc",
        space="acme",
        url=SECRET_URL,
        signing_secrets=("whsec_c2VjcmV0c2VjcmV0c2VjcmV0",),
    )


def test_endpoint_repr_has_no_url(endpoint: Endpoint) -> None:
    for text in (
        repr(endpoint),
        str(endpoint),
        f"{endpoint}",
        repr([endpoint]),
        repr({"e": endpoint}),
    ):
        assert "secret-token" not in text
        assert "sig=abc" not in text
        assert "https://" not in text
        assert "whsec_" not in text
        assert "hooks.acme.example" in text
        assert "ep_abc" in text


def test_endpoint_in_log_line_has_no_url(
    endpoint: Endpoint, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        logging.getLogger("test").info("delivering to %s / %r", endpoint, endpoint)
    assert "secret-token" not in caplog.text


def test_endpoint_host(endpoint: Endpoint) -> None:
    assert endpoint.host == "hooks.acme.example"
    assert Endpoint(id="ep_x", space="s", url="https://[2001:db8::1]:8443/x").host == "2001:db8::1"


def test_delivery_ids_are_those_of_every_earlier_version() -> None:
    """x-perkamo-delivery is the receivers' idempotency key: a cheaper encoding must give
    exactly the ids earlier versions gave (base32 of the whole SHA-256, first 26 characters)."""
    import hashlib
    from base64 import b32encode

    assert delivery_id_for("evt_01J8Z3", "ep_abc") == "dlv_iyavmsv73fctfqh732n7o4p72a"
    for n in range(500):
        digest = hashlib.sha256(f"evt_{n}\x00ep_{n % 7}".encode()).digest()
        assert delivery_id_for(f"evt_{n}", f"ep_{n % 7}") == "dlv_" + b32encode(digest).decode()[:26].lower()
