"""Opt-in Standard Webhooks signatures (https://www.standardwebhooks.com/).

An endpoint with `signing_secrets` gets three more headers: `webhook-id` (the delivery id),
`webhook-timestamp` (unix seconds) and `webhook-signature`, a space-separated list of
`v1,<base64 HMAC-SHA256>` over `"{id}.{timestamp}." + body`, one per secret, so a receiver
keeps verifying while secrets rotate. A secret is `whsec_` + base64 of the key bytes.
Secrets never appear in error messages.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Mapping, Sequence
from typing import Final

from consumer.errors import InvalidEndpoint

H_WEBHOOK_ID: Final = "webhook-id"
H_WEBHOOK_TIMESTAMP: Final = "webhook-timestamp"
H_WEBHOOK_SIGNATURE: Final = "webhook-signature"

WHSEC_PREFIX: Final = "whsec_"
SIGNATURE_VERSION: Final = "v1"
DEFAULT_TOLERANCE_S: Final = 300


def decode_secret(secret: str) -> bytes:
    """The HMAC key of a `whsec_<base64>` secret; InvalidEndpoint (secret not echoed) if bad."""
    if not secret.startswith(WHSEC_PREFIX):
        raise InvalidEndpoint(f"a signing secret does not start with {WHSEC_PREFIX!r}")
    try:
        key = base64.b64decode(secret[len(WHSEC_PREFIX) :], validate=True)
    except binascii.Error:
        raise InvalidEndpoint("a signing secret is not valid base64 after 'whsec_'") from None
    if not key:
        raise InvalidEndpoint("a signing secret is empty")
    return key


def sign(key: bytes, delivery_id: str, timestamp: int, body: bytes) -> str:
    """One `v1,<base64 HMAC-SHA256>` signature of `"{id}.{timestamp}." + body`."""
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(key, signed, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode('ascii')}"


def signature_headers(
    secrets: Sequence[str], delivery_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    """The three Standard Webhooks headers, one signature per secret; {} when there are none."""
    if not secrets:
        return {}
    signatures = [sign(decode_secret(s), delivery_id, timestamp, body) for s in secrets]
    return {
        H_WEBHOOK_ID: delivery_id,
        H_WEBHOOK_TIMESTAMP: str(timestamp),
        H_WEBHOOK_SIGNATURE: " ".join(signatures),
    }


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """A header by case-insensitive name, from any mapping (dict, CIMultiDict)."""
    if name in headers:
        return headers[name]
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None


def _fresh(timestamp: str, tolerance_s: int, now: int) -> int | None:
    """The timestamp as an int if it is within tolerance of now (either side), else None."""
    if not timestamp.isascii() or not timestamp.isdigit():
        return None
    value = int(timestamp)
    return value if abs(now - value) <= tolerance_s else None


def verify(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
    now: int | None = None,
) -> bool:
    """True if a `v1` signature in the headers matches this secret and the timestamp is fresh.

    A malformed secret raises InvalidEndpoint: that is the verifier's mistake, not the sender's.
    """
    delivery_id = _header(headers, H_WEBHOOK_ID)
    timestamp = _header(headers, H_WEBHOOK_TIMESTAMP)
    signatures = _header(headers, H_WEBHOOK_SIGNATURE)
    if not delivery_id or not timestamp or not signatures:
        return False
    when = _fresh(timestamp, tolerance_s, int(time.time()) if now is None else now)
    if when is None:
        return False
    expected = sign(decode_secret(secret), delivery_id, when, body).encode()
    # compare every candidate, so timing does not tell which position matched
    matches = [hmac.compare_digest(expected, c.encode()) for c in signatures.split(" ") if c]
    return any(matches)
