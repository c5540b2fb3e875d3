"""The v1 delivery contract's request, as the receiver sees it: shared by the deliver role,
which sends it, and the console, which shows it (docs/delivery-contract.md)."""

from __future__ import annotations

from consumer import constants as c
from consumer.models import Event


def contract_headers(event: Event, delivery_id: str, attempt: int) -> dict[str, str]:
    """The v1 contract's request headers, in order."""
    return {
        c.H_CONTENT_TYPE: "application/json",
        c.H_USER_AGENT: c.USER_AGENT,
        c.H_DELIVERY: delivery_id,
        c.H_EVENT: event.type,
        c.H_SPACE: event.space_slug,
        c.H_ATTEMPT: str(attempt),
    }
