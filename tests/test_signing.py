"""Standard Webhooks signatures: the spec vector, an independent recomputation, rotation."""

import base64
import hashlib
import hmac

import pytest

from consumer.errors import InvalidEndpoint
from consumer.signing import signature_headers, verify

# The example from the Standard Webhooks specification.
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TS = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

OTHER_SECRET = "whsec_" + base64.b64encode(b"another-key-of-32-bytes-length!!").decode()


def by_hand(secret: str, msg_id: str, ts: int, body: bytes) -> str:
    """The signature recomputed here, without the module under test."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, msg_id.encode() + b"." + str(ts).encode() + b"." + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def test_spec_vector() -> None:
    headers = signature_headers([SPEC_SECRET], SPEC_ID, SPEC_TS, SPEC_BODY)
    assert headers == {
        "webhook-id": SPEC_ID,
        "webhook-timestamp": "1614265330",
        "webhook-signature": SPEC_SIGNATURE,
    }


def test_independent_recomputation_matches() -> None:
    body = b'{"event":"points.earned","amount":10}'
    headers = signature_headers([OTHER_SECRET], "dlv_123", 1_700_000_000, body)
    assert headers["webhook-signature"] == by_hand(OTHER_SECRET, "dlv_123", 1_700_000_000, body)


def test_no_secrets_no_headers() -> None:
    assert signature_headers([], "dlv_1", 1, b"{}") == {}


def test_rotation_signs_with_every_secret_and_both_verify() -> None:
    headers = signature_headers([SPEC_SECRET, OTHER_SECRET], SPEC_ID, SPEC_TS, SPEC_BODY)
    assert headers["webhook-signature"].split(" ") == [
        SPEC_SIGNATURE,
        by_hand(OTHER_SECRET, SPEC_ID, SPEC_TS, SPEC_BODY),
    ]
    assert verify(SPEC_SECRET, headers, SPEC_BODY, now=SPEC_TS)
    assert verify(OTHER_SECRET, headers, SPEC_BODY, now=SPEC_TS)


def spec_headers() -> dict[str, str]:
    return {
        "webhook-id": SPEC_ID,
        "webhook-timestamp": str(SPEC_TS),
        "webhook-signature": SPEC_SIGNATURE,
    }


def test_verify_accepts_spec_example_with_any_header_case() -> None:
    headers = {k.title(): v for k, v in spec_headers().items()}
    assert verify(SPEC_SECRET, headers, SPEC_BODY, now=SPEC_TS + 10)


def test_verify_rejects_tampered_body() -> None:
    assert not verify(SPEC_SECRET, spec_headers(), b'{"test": 2432232315}', now=SPEC_TS)


def test_verify_rejects_wrong_secret() -> None:
    assert not verify(OTHER_SECRET, spec_headers(), SPEC_BODY, now=SPEC_TS)


@pytest.mark.parametrize("skew", [-301, 301, -10_000])
def test_verify_rejects_timestamp_outside_tolerance(skew: int) -> None:
    assert not verify(SPEC_SECRET, spec_headers(), SPEC_BODY, now=SPEC_TS - skew)


def test_verify_rejects_changed_timestamp_or_id() -> None:
    moved = spec_headers() | {"webhook-timestamp": str(SPEC_TS + 1)}
    assert not verify(SPEC_SECRET, moved, SPEC_BODY, now=SPEC_TS)
    renamed = spec_headers() | {"webhook-id": "msg_other"}
    assert not verify(SPEC_SECRET, renamed, SPEC_BODY, now=SPEC_TS)


@pytest.mark.parametrize(
    "changes",
    [
        {"webhook-signature": ""},
        {"webhook-signature": "v2," + SPEC_SIGNATURE[3:]},
        {"webhook-timestamp": "soon"},
        {"webhook-id": ""},
    ],
)
def test_verify_rejects_malformed_headers(changes: dict[str, str]) -> None:
    assert not verify(SPEC_SECRET, spec_headers() | changes, SPEC_BODY, now=SPEC_TS)


def test_verify_rejects_missing_headers() -> None:
    assert not verify(SPEC_SECRET, {}, SPEC_BODY, now=SPEC_TS)


@pytest.mark.parametrize("bad", ["MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_not*base64!"])
def test_malformed_secret_is_refused_without_echoing_it(bad: str) -> None:
    with pytest.raises(InvalidEndpoint) as caught:
        signature_headers([bad], "dlv_1", 1, b"{}")
    assert bad.removeprefix("whsec_") not in str(caught.value)


def test_empty_secret_is_refused() -> None:
    with pytest.raises(InvalidEndpoint):
        signature_headers(["whsec_"], "dlv_1", 1, b"{}")
