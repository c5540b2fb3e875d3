"""Names users and other services depend on: topics, headers, statuses, triggers.

They are listed in docs/architecture.md (names users depend on) and change only with a note.
"""

from enum import StrEnum
from typing import Final

EVENTS_TOPIC: Final = "perkamo.events"
RETRY_TOPIC_PREFIX: Final = "perkamo.webhooks.retry."
DLQ_TOPIC: Final = "perkamo.webhooks.dlq"
ENDPOINTS_TOPIC: Final = "perkamo.webhooks.endpoints"
# Deliveries waiting for an endpoint whose circuit is open (or that is saturated); key =
# endpoint id, so one consumer holds all of an endpoint's held deliveries.
HELD_TOPIC: Final = "perkamo.webhooks.held"
# One record per attempt (and hold record), key = delivery id: the durable log the history
# table is built from (schemas/attempt.schema.json).
ATTEMPTS_TOPIC: Final = "perkamo.webhooks.attempts"
# Resends and replays, re-published by the history role with their perkamo-* headers. Only the
# service writes it (like the retry tiers and the held topic), so the deliver role trusts the
# headers here and ignores them on the events topics (docs/security.md, what is trusted).
REDELIVER_TOPIC: Final = "perkamo.webhooks.redeliver"
# Compact records for notifiers: a circuit opened or closed, a delivery exhausted.
OPERATIONAL_TOPIC: Final = "perkamo.webhooks.operational"

HISTORY_DATABASE: Final = "perkamo"
HISTORY_TABLE: Final = "webhook_attempts"

USER_AGENT: Final = "Perkamo-Webhook/1.0"

# Request headers of the v1 delivery contract, in the order they are sent.
H_CONTENT_TYPE: Final = "content-type"
H_USER_AGENT: Final = "user-agent"
H_DELIVERY: Final = "x-perkamo-delivery"
H_EVENT: Final = "x-perkamo-event"
H_SPACE: Final = "x-perkamo-space"
H_ATTEMPT: Final = "x-perkamo-attempt"

# Kafka headers on retry / DLQ / resend / replay messages.
K_DELIVERY_ID: Final = "perkamo-delivery-id"
K_ATTEMPT: Final = "perkamo-attempt"  # the number of the NEXT attempt
# The next attempt's number within its run (the initial delivery, a resend or a replay): the
# retry tier follows it, so a resend after exhausted tiers walks the tiers again.
K_RUN_ATTEMPT: Final = "perkamo-run-attempt"
K_DUE_MS: Final = "perkamo-due-ms"
K_FIRST_FAILED_MS: Final = "perkamo-first-failed-ms"
# When the current run (the initial delivery, a resend or a replay) began: its life ends
# at this time plus the schedule's span.
K_RUN_STARTED_MS: Final = "perkamo-run-started-ms"
# On held-topic messages: when this hold began, and why (circuit_open, endpoint_saturated).
K_HELD_SINCE_MS: Final = "perkamo-held-since-ms"
K_HOLD_REASON: Final = "perkamo-hold-reason"
K_ORIGIN_TOPIC: Final = "perkamo-origin-topic"
K_ORIGIN_PARTITION: Final = "perkamo-origin-partition"
K_ORIGIN_OFFSET: Final = "perkamo-origin-offset"
K_ERROR_KIND: Final = "perkamo-error-kind"
K_STATUS_CODE: Final = "perkamo-status-code"
K_TRIGGER: Final = "perkamo-trigger"
K_REPLAY_ID: Final = "perkamo-replay-id"
K_DLQ_REASON: Final = "perkamo-dlq-reason"
K_DLQ_DETAIL: Final = "perkamo-dlq-detail"
# On a stub dead letter (a message Kafka refused, or too big to re-publish whole): the topic it
# was meant for, and the full value's length and SHA-256 (hex); the value is its first bytes.
K_STUB_OF_TOPIC: Final = "perkamo-stub-of-topic"
K_VALUE_BYTES: Final = "perkamo-value-bytes"
K_VALUE_SHA256: Final = "perkamo-value-sha256"

# The highest attempt number: the deliver role refuses attempt headers above it, and a resend
# or replay past it is refused.
MAX_ATTEMPT: Final = 10_000
# Receiver-controlled text is capped where it enters an attempt record and history.
STATUS_TEXT_MAX: Final = 256
ERROR_MAX: Final = 1024

# Delivery statuses recorded in history.
STATUS_DELIVERED: Final = "delivered"
STATUS_RETRYING: Final = "retrying"
STATUS_FAILED: Final = "failed"
# Only on hold records (attempt 0): waiting for the endpoint, no call made.
STATUS_HELD: Final = "held"

# What caused an attempt.
TRIGGER_INITIAL: Final = "initial"
TRIGGER_RETRY: Final = "retry"
TRIGGER_RESEND: Final = "resend"
TRIGGER_REPLAY: Final = "replay"
TRIGGERS: Final = (TRIGGER_INITIAL, TRIGGER_RETRY, TRIGGER_RESEND, TRIGGER_REPLAY)


class Outcome(StrEnum):
    """What one attempt came to: the `outcome` label of attempts_total, and history's
    `error_kind` of a failed attempt. DELIVERED is the only success."""

    DELIVERED = "delivered"
    HTTP_STATUS = "http_status"  # a non-2xx answer, 3xx included (redirects are not followed)
    TIMEOUT = "timeout"
    CONNECT = "connect_error"
    TLS = "tls_error"
    BLOCKED = "blocked_address"
    PROTOCOL = "protocol_error"


class DlqReason(StrEnum):
    """Why a message was dead-lettered: the `perkamo-dlq-reason` header and the `reason` label
    of dead_lettered_total. The first five are bad input (also invalid_events_total's label)."""

    EMPTY = "empty"
    OVERSIZED = "oversized"
    INVALID_JSON = "invalid_json"
    SCHEMA = "schema"
    BAD_HEADER = "bad_header"
    INTERNAL = "internal_error"
    EXHAUSTED = "exhausted"  # every tier tried
    EXPIRED = "expired"  # the schedule's span passed while an open circuit held it
    # Kafka refused to take what the delivery had to publish (its size or form): the message
    # goes to the dead-letter topic as a stub, and its offset is released.
    UNPUBLISHABLE = "unpublishable"


class HoldReason(StrEnum):
    """Why a delivery was parked on the held topic: the `perkamo-hold-reason` header, the
    `reason` label of holds_total and a hold record's `error_kind`."""

    CIRCUIT_OPEN = "circuit_open"
    SATURATED = "endpoint_saturated"
