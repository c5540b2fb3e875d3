"""What the console needs of the process that serves it: the one integration surface.

The history role (consumer.history_role.HistoryRole) provides it: the console is served on
its admin listener. The console reads nothing else of the service.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from pydantic import SecretStr

from consumer.models import Endpoint
from consumer.queries import Reader
from consumer.registry_publish import Receipt
from consumer.republish import Progress
from consumer.republish_plan import ReplayPlan, ResendResult, Selection


class ConsoleSettings(Protocol):
    """The settings the console reads (consumer.config.Settings has them)."""

    @property
    def admin_token(self) -> SecretStr: ...

    @property
    def console_secret(self) -> SecretStr: ...

    @property
    def console_session_ttl_s(self) -> float: ...

    @property
    def console_base_url(self) -> str: ...

    @property
    def history_max_concurrent_queries(self) -> int: ...

    @property
    def history_max_span_days(self) -> float: ...


class Republishing(Protocol):
    """Resend and replay through Kafka (consumer.republish.Republisher). Share ONE instance
    with the history API: its double-work guard is per instance."""

    async def resend(
        self, delivery_id: str, force: bool = False, space: str = "", scoped: bool = False
    ) -> ResendResult: ...

    async def plan_replay(
        self, selection: Selection, force: bool = False, reserve: bool = True
    ) -> ReplayPlan: ...

    async def execute(self, plan: ReplayPlan, progress: Progress | None = None) -> int: ...


class EndpointDirectory(Protocol):
    """The endpoint registry in effect (consumer.endpoints.EndpointRegistry)."""

    def get(self, space: str) -> Endpoint | None:
        """The Space's ACTIVE endpoint, or None."""

    def all(self) -> list[Endpoint]:
        """Every record in effect, active or not, one per Space."""


class ConsoleContext(Protocol):
    """Everything the console uses. All but publish_endpoint are called on the event loop and
    must not block it, except `reader.query`, which the console calls in a thread."""

    @property
    def settings(self) -> ConsoleSettings: ...

    @property
    def reader(self) -> Reader: ...

    @property
    def republisher(self) -> Republishing: ...

    @property
    def endpoints(self) -> EndpointDirectory: ...

    async def publish_endpoint(self, space: str, record: Mapping[str, Any] | None) -> Receipt:
        """Publish an endpoint record (None = tombstone) to the registry topic and wait for
        the broker's acknowledgement, as `endpoints set|remove` do."""

    def endpoint_health(self, space: str) -> Mapping[str, Any] | None:
        """The endpoint's health, or None when unknown. Keys the console shows when present:
        state (healthy|degraded|failing|circuit_open), circuit (closed|open|half_open),
        failure_rate (0..1), last_success_at, last_failure_at (datetime or ISO text), held."""
