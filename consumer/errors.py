"""One root error type; each subclass says what went wrong and what to do next."""


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
    """The history store did not accept a write; the writer keeps the rows and retries."""


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
