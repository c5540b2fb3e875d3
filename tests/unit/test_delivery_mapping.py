"""consumer.delivery's pure parts: the contract headers and the exception -> outcome map."""

from __future__ import annotations

import errno
import ssl

import aiohttp
import pytest
from aiohttp.client_reqrep import ConnectionKey, RequestInfo
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from consumer.constants import Outcome
from consumer.contract import contract_headers
from consumer.delivery import _failure
from consumer.errors import BlockedAddress
from consumer.models import AttemptResult, Event

HOST = "hooks.acme.example"
URL_TEXT = f"https://{HOST}/t/9f2c-secret-token"
SECRET_PART = "9f2c-secret-token"


def make_event() -> Event:
    return Event(
        body=b"{}",
        id="evt_1",
        type="points.earned",
        space_slug="acme-shop",
        environment="production",
        user_id="u1",
        transaction_id="",
    )


def connection_key(host: str = HOST, port: int = 443) -> ConnectionKey:
    return ConnectionKey(
        host=host,
        port=port,
        is_ssl=True,
        ssl=True,
        proxy=None,
        proxy_auth=None,
        proxy_headers_hash=None,
    )


def request_info() -> RequestInfo:
    url = URL(URL_TEXT)
    return RequestInfo(url, "POST", CIMultiDictProxy(CIMultiDict()), url)


def failure(exc: BaseException) -> AttemptResult:
    result = _failure(exc, HOST, URL_TEXT, 12)
    assert result.duration_ms == 12
    assert result.status_code == 0
    assert not result.delivered
    assert URL_TEXT not in result.error
    assert SECRET_PART not in result.error
    assert len(result.error) <= 500
    return result


# contract_headers ----------------------------------------------------------------------


def test_contract_headers_exact_names_values_and_order() -> None:
    headers = contract_headers(make_event(), "dlv_abc", 3)
    assert list(headers.items()) == [
        ("content-type", "application/json"),
        ("user-agent", "Perkamo-Webhook/1.0"),
        ("x-perkamo-delivery", "dlv_abc"),
        ("x-perkamo-event", "points.earned"),
        ("x-perkamo-space", "acme-shop"),
        ("x-perkamo-attempt", "3"),
    ]


def test_contract_headers_first_attempt_is_one() -> None:
    assert contract_headers(make_event(), "dlv_abc", 1)["x-perkamo-attempt"] == "1"


# _failure ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "exc",
    [
        TimeoutError(),  # what asyncio.timeout / ClientTimeout raise (asyncio.TimeoutError on 3.11)
        aiohttp.ServerTimeoutError("read timed out"),
        aiohttp.ConnectionTimeoutError("connect timed out"),
        aiohttp.SocketTimeoutError("socket timed out"),
    ],
)
def test_timeout(exc: BaseException) -> None:
    result = failure(exc)
    assert result.outcome == Outcome.TIMEOUT
    assert "timed out" in result.error


def test_certificate_error_is_tls() -> None:
    cert_error = ssl.SSLCertVerificationError(
        1, "certificate verify failed: unable to get local issuer"
    )
    exc = aiohttp.ClientConnectorCertificateError(connection_key(), cert_error)
    result = failure(exc)
    assert result.outcome == Outcome.TLS
    assert result.error.startswith("TLS error: ClientConnectorCertificateError")


def test_ssl_error_is_tls() -> None:
    exc = aiohttp.ClientConnectorSSLError(connection_key(), ssl.SSLError(1, "wrong version number"))
    assert failure(exc).outcome == Outcome.TLS


def test_connector_error_wrapping_ssl_error_is_tls() -> None:
    exc = aiohttp.ClientConnectorError(connection_key(), ssl.SSLError(1, "handshake failure"))
    assert failure(exc).outcome == Outcome.TLS


def test_connection_refused_is_connect_error() -> None:
    os_error = ConnectionRefusedError(
        errno.ECONNREFUSED, "Connect call failed ('203.0.113.7', 443)"
    )
    exc = aiohttp.ClientConnectorError(connection_key(), os_error)
    result = failure(exc)
    assert result.outcome == Outcome.CONNECT
    assert result.error.startswith("cannot connect: ClientConnectorError")
    assert HOST in result.error


def test_dns_failure_is_connect_error() -> None:
    exc = aiohttp.ClientConnectorDNSError(
        connection_key(), OSError(-2, "Name or service not known")
    )
    assert failure(exc).outcome == Outcome.CONNECT


@pytest.mark.parametrize(
    "exc",
    [
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientPayloadError("Response payload is not completed"),
    ],
)
def test_dropped_connection_is_protocol_error(exc: BaseException) -> None:
    result = failure(exc)
    assert result.outcome == Outcome.PROTOCOL
    assert result.error.startswith("connection dropped:")


def test_response_error_is_protocol_error_without_url() -> None:
    exc = aiohttp.ClientResponseError(
        request_info(), (), status=400, message="Invalid header value char"
    )
    assert SECRET_PART in str(exc)  # aiohttp's own text has the URL ...
    result = failure(exc)  # ... ours does not
    assert result.outcome == Outcome.PROTOCOL
    assert (
        result.error == "invalid HTTP response: ClientResponseError: 400 Invalid header value char"
    )


def test_invalid_url_error_has_no_url() -> None:
    exc = aiohttp.InvalidURL(URL_TEXT, "bad port")
    result = failure(exc)
    assert result.outcome == Outcome.CONNECT
    assert "invalid URL" in result.error


def test_error_text_with_the_url_is_reduced_to_the_host() -> None:
    result = failure(aiohttp.ClientOSError(errno.ECONNRESET, f"reset while talking to {URL_TEXT}"))
    assert result.outcome == Outcome.CONNECT
    assert HOST in result.error


def test_blocked_address() -> None:
    blocked = BlockedAddress(HOST, "private")
    result = failure(blocked)
    assert result.outcome == Outcome.BLOCKED
    assert result.error.startswith("address refused:")
    assert "private" in result.error


def test_blocked_address_wrapped_by_the_connector() -> None:
    blocked = BlockedAddress(HOST, "loopback")
    wrapped = aiohttp.ClientConnectorDNSError(connection_key(), blocked)
    try:
        raise wrapped from blocked
    except aiohttp.ClientConnectorDNSError as exc:
        result = failure(exc)
    assert result.outcome == Outcome.BLOCKED
    assert "loopback" in result.error


def test_blocked_address_found_through_os_error_only() -> None:
    wrapped = aiohttp.ClientConnectorError(connection_key(), BlockedAddress(HOST, "metadata"))
    assert failure(wrapped).outcome == Outcome.BLOCKED


def test_unexpected_error_names_only_the_type(caplog: pytest.LogCaptureFixture) -> None:
    result = failure(RuntimeError(f"boom at {URL_TEXT}"))
    assert result.outcome == Outcome.PROTOCOL
    assert result.error == "unexpected error: RuntimeError"
    assert SECRET_PART not in caplog.text


def test_every_outcome_is_a_known_label() -> None:
    cases: list[BaseException] = [
        TimeoutError(),
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientConnectorError(connection_key(), ConnectionRefusedError(111, "refused")),
        BlockedAddress(HOST, "private"),
        ValueError("x"),
    ]
    assert {failure(exc).outcome for exc in cases} <= set(Outcome)
