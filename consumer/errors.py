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


class BlockedAddress(PerkamoError):
    """The endpoint's host resolves to an address the SSRF guard refuses."""


class HistoryUnavailable(PerkamoError):
    """The history store did not accept a write; the writer keeps the rows and retries."""


class KafkaError(PerkamoError):
    """The broker refused or failed an operation the service cannot go on without."""
