"""One root error type; each subclass says what went wrong and what to do next.

    PerkamoError
    ├── ConfigError ─────────────── a setting is wrong: start-up stops, exit 78
    │   ├── BadEndpointsFile (also InvalidEndpoint)
    │   └── KafkaRefused (also KafkaFailure)
    ├── InvalidEvent ────────────── an input message cannot become a delivery (dead-lettered)
    ├── BadRecord ───────────────── a message on the attempts topic is not a record (skipped)
    ├── InvalidEndpoint ─────────── an endpoint record breaks the rules
    ├── Parked / Expired / EndpointGone ── an endpoint's gate says: hold it, its life ended,
    │                               look the endpoint up again (consumer.gate)
    ├── Throttled ───────────────── too many wrong credentials: retry after a while (429)
    ├── ApiFailure ──────────────── the admin API answered the CLI with an error status
    ├── BlockedAddress (also OSError) ── the SSRF guard refused the address
    ├── HistoryUnavailable ──────── the history store cannot be opened
    ├── KafkaFailure ────────────── the broker failed an operation
    │   └── KafkaWriteFailed ────── one message not taken (`permanent` when refused for good)
    └── RequestError ────────────── an API or console request that cannot be served as asked;
        │                           its `status` is the HTTP answer (one mapping: consumer.admin)
        ├── ApiError (any status it is given)
        ├── BadRequest (400) ─── SeveralSpaces
        ├── NotFound (404) ──── OriginalUnavailable (a cut body's original is gone)
        ├── Conflict (409)
        ├── Busy (429, Retry-After)
        ├── PublishFailed (502)
        └── NotReady (503) ──── OriginalOutOfReach
    AuthError (consumer.auth) and ConsoleError (consumer.console.base) stay beside the answers
    they render; AuthError carries its own status, ConsoleError is an ApiError.
"""

from typing import Any, ClassVar


class PerkamoError(Exception):
    """Root of every error this service raises on purpose."""


class ConfigError(PerkamoError):
    """A setting is missing or invalid; the message names the setting."""


class InvalidEvent(PerkamoError):
    """An input message cannot become a delivery; `reason` is a short, bounded label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class InvalidEndpoint(PerkamoError):
    """An endpoint record breaks the schema or the https/public-address rules."""


class BadEndpointsFile(InvalidEndpoint, ConfigError):
    """PERKAMO_ENDPOINTS_FILE cannot be read or holds a bad record: a setting no restart mends
    (the process exits 78, and `run --role all` does not restart it)."""


class BlockedAddress(PerkamoError, OSError):
    """The endpoint's host resolves to an address the SSRF guard refuses.

    An OSError so aiohttp's connector wraps it like any connection failure
    (`ClientConnectorDNSError` with `os_error` and `__cause__` set to this); use
    `consumer.netguard.blocked_cause` to find it. Carries the host and a bounded reason
    label only, never the URL (a secret) and never the refused addresses.
    """

    def __init__(self, host: str, reason: str) -> None:
        super().__init__(
            13,  # EACCES: refused by policy, like a firewall would
            f"{host}: address refused by the SSRF guard ({reason}); endpoints must be "
            "public, or the network listed in PERKAMO_ALLOW_PRIVATE_NETWORKS",
        )
        self.host = host
        self.reason = reason

    def __str__(self) -> str:
        return str(self.strerror)

    # OSError.__reduce__ would rebuild from (errno, strerror); rebuild from our own fields.
    def __reduce__(self) -> tuple[type["BlockedAddress"], tuple[str, str]]:
        return (type(self), (self.host, self.reason))


class HistoryUnavailable(PerkamoError):
    """The history store cannot be opened; the message names it (its DSN masked)."""


class KafkaFailure(PerkamoError):
    """The broker refused or failed an operation the service cannot go on without."""


class KafkaWriteFailed(KafkaFailure):
    """Kafka did not take one message. `permanent`: it refused the message itself (its size or
    form), and publishing it again cannot help; otherwise the cluster could not take it now
    (brokers down, a leader moving, a timeout, a missing topic) and a later try may."""

    def __init__(self, topic: str, code: int, name: str, text: str, permanent: bool) -> None:
        super().__init__(f"publish to {topic} failed: {name} ({text})")
        self.topic = topic
        self.code = code
        self.name = name
        self.permanent = permanent


class KafkaRefused(KafkaFailure, ConfigError):
    """The cluster refused our credentials or our TLS: a PERKAMO_KAFKA_* setting is wrong, and
    trying again will not help (the supervisor does not restart a role that exits for it)."""


class RequestError(PerkamoError):
    """A request the history API or the console cannot serve as asked; `status` is the HTTP
    status of its answer, `fields()` what the JSON answer adds to `error`."""

    status: ClassVar[int] = 400

    def fields(self) -> dict[str, Any]:
        return {}

    def headers(self) -> dict[str, str]:
        return {}


class BadRequest(RequestError):
    """A filter, time or cursor the caller gave is not valid; the message says which and why."""


class SeveralSpaces(BadRequest):
    """An admin asked for a delivery id that has rows in more than one Space (only a forged
    header could make that): the answer names the Spaces, the caller names one."""


class NotFound(RequestError):
    """History holds no attempt of this delivery (unknown id, or past the TTL)."""

    status = 404


class Conflict(RequestError):
    """Re-publishing now would double work; `force` overrides. Names what it collides with."""

    status = 409

    def __init__(
        self, message: str, replay_id: str = "", details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.replay_id = replay_id
        self.details = details or {}

    def fields(self) -> dict[str, Any]:
        return {"replay_id": self.replay_id or None, **self.details}


class Busy(RequestError):
    """Every history read place is taken (or this caller's share of them): retry shortly."""

    status = 429
    retry_after_s: ClassVar[int] = 1

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class PublishFailed(RequestError):
    """Kafka did not acknowledge some re-published messages; `published` did go out."""

    status = 502

    def __init__(self, message: str, published: int) -> None:
        super().__init__(message)
        self.published = published

    def fields(self) -> dict[str, Any]:
        return {"published": self.published}


class NotReady(RequestError):
    """Kafka did not answer in time (e.g. reading a cut body's original back): try again in a
    moment."""

    status = 503


class ApiError(RequestError):
    """An answer of any status the handler chose, with a message and extra JSON fields."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None,
                 **extra: Any) -> None:
        super().__init__(message)
        self.status = status  # type: ignore[misc]  # an instance's own status
        self._headers = headers or {}
        self._extra = extra

    def fields(self) -> dict[str, Any]:
        return self._extra

    def headers(self) -> dict[str, str]:
        return self._headers


class BadRecord(PerkamoError):
    """A message on the attempts topic that is not an attempt record this version can read."""


class Throttled(PerkamoError):
    """Too many wrong credentials: try again in `retry_after` seconds (a whole number, >= 1)."""

    def __init__(self, retry_after: float) -> None:
        self.retry_after = int(retry_after) + 1
        super().__init__(f"too many wrong credentials: try again in {self.retry_after} s")


class Parked(PerkamoError):
    """The endpoint cannot take this delivery now: park it on the held topic."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"delivery held: {reason}")
        self.reason = reason


class Expired(PerkamoError):
    """A held delivery's deadline (the end of its schedule's span) passed while it waited."""


class EndpointGone(PerkamoError):
    """The endpoint was removed or changed while the delivery waited: look it up again."""


class ApiFailure(PerkamoError):
    """The admin API answered with an error status; `doc` is its JSON answer."""

    def __init__(self, status: int, doc: dict[str, Any]) -> None:
        super().__init__(str(doc.get("error") or f"HTTP {status}"))
        self.status = status
        self.doc = doc


class OriginalUnavailable(NotFound):
    """A cut body's original cannot be re-published: gone from its topic, or not the same bytes."""


class OriginalOutOfReach(NotReady):
    """Kafka did not answer in time: the original may still be there; try again."""
