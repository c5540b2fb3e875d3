"""The history SQL the project offers: the API's, the console's and the analysts' queries.

Every query here deduplicates: a crash or a replay of the same Kafka offset can write an
attempt row twice, and ReplacingMergeTree keeps one per (space_slug, delivery_id, attempt)
only when parts merge, so each SELECT reads the table with FINAL (docs/analysts.md). The one
exception says so in a comment (a first step whose every result is read again with FINAL).

A *delivery* is all rows with one delivery id: its attempts (attempt >= 1, one per call made)
and at most one hold record (attempt 0: `held` while an open circuit holds it, `failed` if its
schedule's span ran out while held; `pending_attempt` is the attempt it waits to make). Its
status is the status of its newest row (by attempted_at, then attempt), and it belongs to the
time window of its FIRST row: the window of a delivery never moves when it is retried, resent
or replayed, so paging and replay selections stay stable while new attempts arrive. A row's
place in the run is `if(attempt = 0, pending_attempt, attempt)`; 1 marks the first row.

`README_QUERIES` are the analysts' queries of docs/analysts.md, word for word; tests run them.
"""

from __future__ import annotations

from typing import Final

# The most deliveries one replay request takes (consumer.republish_plan.MAX_REPLAY): the
# selection reads one more row, to know the cap was passed without loading every row.
REPLAY_CAP: Final = 100_000

# The API's SQL -------------------------------------------------------------------------

# One row per delivery: what the delivery list shows, over the rows of a Space (or every
# Space), an event type and a window; the HAVING on the first row drops deliveries whose first
# row is older than `since` (only their later rows passed the WHERE).
_DELIVERY_ROWS = """
SELECT
    delivery_id,
    any(space_slug) AS space,
    argMin(event_id, attempt) AS event_id,
    argMin(event_type, attempt) AS event_type,
    argMax(status, (attempted_at, attempt)) AS status,
    countIf(attempt > 0) AS attempts,
    max(attempt) AS last_attempt,
    argMax(trigger, attempt) AS last_trigger,
    argMax(status_code, attempt) AS last_status_code,
    argMax(error_kind, attempt) AS last_error_kind,
    argMax(endpoint_host, attempt) AS endpoint_host,
    argMax(tuple(next_attempt_at), attempt).1 AS next_attempt_at,
    min(attempted_at) AS first_attempted_at,
    max(attempted_at) AS last_attempted_at
FROM perkamo.webhook_attempts FINAL
WHERE ({space:String} = '' OR space_slug = {space:String})
  AND ({event_type:String} = '' OR webhook_attempts.event_type = {event_type:String})
  AND attempted_at >= {since:DateTime64(3, 'UTC')}
"""
_FIRST_IN_WINDOW = """HAVING min(if(attempt = 0, pending_attempt, attempt)) = 1
  AND first_attempted_at < {until:DateTime64(3, 'UTC')}
  AND ({status:String} = '' OR status = {status:String})
"""

# One row per delivery of the window, newest first, after a keyset cursor (`attempted_at >=
# since` prunes partitions).
_AFTER_CURSOR = """\
  AND (first_attempted_at, delivery_id) < ({after_at:DateTime64(3, 'UTC')}, {after_id:String})
"""
DELIVERIES: Final = _DELIVERY_ROWS + "GROUP BY delivery_id\n" + _FIRST_IN_WINDOW + _AFTER_CURSOR + """\
ORDER BY first_attempted_at DESC, delivery_id DESC
LIMIT {limit:UInt32}
"""

# The console's search: deliveries with this delivery id, event id or transaction id, in a
# bounded window (search_deliveries never leaves `since` open), newest first.
DELIVERY_SEARCH: Final = _DELIVERY_ROWS + """  AND space_slug IN {candidate_spaces:Array(String)}
  AND delivery_id IN {candidates:Array(String)}
  AND (delivery_id = {q:String} OR webhook_attempts.event_id = {q:String}
       OR transaction_id = {q:String})
GROUP BY delivery_id
""" + _FIRST_IN_WINDOW + """ORDER BY first_attempted_at DESC, delivery_id DESC
LIMIT {limit:UInt32}
"""

# The search's first step: which deliveries have a matching row. Without FINAL the bloom
# filters skip granules (FINAL's exact mode widens them to whole key ranges again).
SEARCH_CANDIDATES: Final = """
-- No FINAL needed: a duplicate row names the same delivery, and DELIVERY_SEARCH checks
-- every candidate again with FINAL.
SELECT DISTINCT space_slug, delivery_id
FROM perkamo.webhook_attempts
WHERE ({space:String} = '' OR space_slug = {space:String})
  AND attempted_at >= {since:DateTime64(3, 'UTC')}
  AND attempted_at < {until:DateTime64(3, 'UTC')}
  AND (delivery_id = {q:String} OR event_id = {q:String} OR transaction_id = {q:String})
LIMIT 1000
"""

# Per Space: HTTP calls made in the last hour and day, and how many were delivered (attempts
# recorded without a call -- circuit open, endpoint saturated -- are not calls).
SUCCESS_RATES: Final = """
SELECT
    space_slug AS space,
    countIf(attempted_at >= {hour_ago:DateTime64(3, 'UTC')}) AS calls_1h,
    countIf(attempted_at >= {hour_ago:DateTime64(3, 'UTC')} AND status = 'delivered') AS delivered_1h,
    count() AS calls_24h,
    countIf(status = 'delivered') AS delivered_24h
FROM perkamo.webhook_attempts FINAL
WHERE attempted_at >= {day_ago:DateTime64(3, 'UTC')}
  AND ({space:String} = '' OR space_slug = {space:String})
  AND error_kind NOT IN ('circuit_open', 'endpoint_saturated')
GROUP BY space_slug
ORDER BY space_slug
"""

# Every attempt of one delivery; the bloom filter on delivery_id finds its granules.
_ATTEMPT_COLUMNS = """
    attempt, trigger, status, status_code, status_text, duration_ms, error_kind, error,
    attempted_at, next_attempt_at, event_id, event_type, space_slug, environment,
    endpoint_id, endpoint_host, user_id, transaction_id, response_excerpt, replay_id,
    source_topic, source_partition, source_offset, pending_attempt,
    trace_id, span_id, dns_ms, connect_ms, tls_ms, ttfb_ms, connection_reused, cert_not_after,
    request_body_truncated, request_body_bytes, request_body_sha256"""
_OF_ONE_DELIVERY = """
FROM perkamo.webhook_attempts FINAL
WHERE delivery_id = {delivery_id:String}
ORDER BY attempt
"""
DELIVERY_ATTEMPTS: Final = "\nSELECT" + _ATTEMPT_COLUMNS + _OF_ONE_DELIVERY

# The API's and the console's by-id read: the rows of one delivery id in one Space ({space}
# '' = every Space, for admins). For a caller confined to the Space ({scoped}: a Space
# session), an id that also has rows in another Space (a collision only a forged header could
# make) matches nothing: neither Space can own it.
_ONE_DELIVERY_IN_SPACE = """
FROM perkamo.webhook_attempts FINAL
WHERE delivery_id = {delivery_id:String}
  AND ({space:String} = '' OR (space_slug = {space:String} AND (NOT {scoped:Bool} OR (
      SELECT uniqExact(space_slug) FROM perkamo.webhook_attempts
      WHERE delivery_id = {delivery_id:String}) = 1)))
ORDER BY space_slug, attempt
"""
SPACE_DELIVERY_ATTEMPTS: Final = "\nSELECT" + _ATTEMPT_COLUMNS + _ONE_DELIVERY_IN_SPACE
# The same with the payload sent (admin token only: consumer.auth).
SPACE_DELIVERY_ATTEMPTS_WITH_BODY: Final = (
    "\nSELECT" + _ATTEMPT_COLUMNS + ",\n    request_body" + _ONE_DELIVERY_IN_SPACE)
# The payload of the one attempt a page shows (the delivery page reads no other body).
ATTEMPT_BODY: Final = """
SELECT request_body
FROM perkamo.webhook_attempts FINAL
WHERE space_slug = {space:String} AND delivery_id = {delivery_id:String}
  AND attempt = {attempt:UInt32}
LIMIT 1
"""

# What a re-publish needs of a delivery: where it stands and where it first came from.
_REPUBLISH_SELECT = """
SELECT
    delivery_id,
    space_slug AS space,
    greatest(max(attempt), max(pending_attempt)) AS last_attempt,
    argMax(status, (attempted_at, attempt)) AS last_status,
    argMax(tuple(next_attempt_at), attempt).1 AS next_attempt_at,
    argMax(replay_id, attempt) AS last_replay_id,
    argMin(source_topic, attempt) AS source_topic,
    argMin(source_partition, attempt) AS source_partition,
    argMin(source_offset, attempt) AS source_offset,
    min(attempted_at) AS first_attempted_at,
    argMax(tuple(trace_id, span_id), (attempted_at, attempt)) AS last_trace
FROM perkamo.webhook_attempts FINAL"""

# The deliveries of one Space whose first attempt is in [since, until), optionally only those
# whose latest attempt has `status`; oldest first, so a replay re-publishes in order. At most
# REPLAY_CAP + 1 rows: one past the cap says "split the range" without loading the rest.
REPLAY_SELECTION: Final = _REPUBLISH_SELECT + """
WHERE space_slug = {space:String}
  AND attempted_at >= {since:DateTime64(3, 'UTC')}
GROUP BY space_slug, delivery_id
HAVING min(if(attempt = 0, pending_attempt, attempt)) = 1
  AND first_attempted_at < {until:DateTime64(3, 'UTC')}
  AND ({status:String} = '' OR last_status = {status:String})
ORDER BY first_attempted_at, delivery_id
""" + f"LIMIT {REPLAY_CAP + 1}\n"

# One delivery id, one row per Space it has rows in ({space} '' = any Space; {scoped} as in
# SPACE_DELIVERY_ATTEMPTS).
REPUBLISH_ONE: Final = _REPUBLISH_SELECT + """
WHERE delivery_id = {delivery_id:String}
  AND ({space:String} = '' OR (space_slug = {space:String} AND (NOT {scoped:Bool} OR (
      SELECT uniqExact(space_slug) FROM perkamo.webhook_attempts
      WHERE delivery_id = {delivery_id:String}) = 1)))
GROUP BY space_slug, delivery_id
"""  # noqa: S608 - constant text; every value is a bound parameter

# The payload to re-publish: the body recorded with the first attempt, base64 so the bytes
# come back exactly as they were sent; or, where that record carries a cut body, what a resend
# needs to read the original back from Kafka and check it (consumer.originals).
BODIES: Final = """
SELECT delivery_id,
    base64Encode(argMin(if(request_body_truncated, '', request_body), attempt)) AS body,
    argMin(request_body_truncated, attempt) AS truncated,
    argMin(request_body_bytes, attempt) AS body_bytes,
    argMin(request_body_sha256, attempt) AS body_sha256,
    argMin(source_topic, attempt) AS source_topic,
    argMin(source_partition, attempt) AS source_partition,
    argMin(source_offset, attempt) AS source_offset
FROM perkamo.webhook_attempts FINAL
WHERE space_slug = {space:String} AND delivery_id IN {delivery_ids:Array(String)}
GROUP BY delivery_id
"""

# Whether a replay id reached history (a replay of the same selection already ran).
REPLAY_ROWS: Final = """
SELECT count() AS attempts, uniqExact(delivery_id) AS deliveries
FROM perkamo.webhook_attempts FINAL
WHERE space_slug = {space:String} AND replay_id = {replay_id:String}
"""


# The analysts' queries (docs/analysts.md) ------------------------------------------------
# Parameters: {space:String} ('' = every Space), {since:…}/{until:…} a half-open time range.

FAILURE_RATE_PER_SPACE_PER_HOUR: Final = """
SELECT
    space_slug,
    toStartOfHour(attempted_at) AS hour,
    count() AS attempts,
    countIf(status != 'delivered') AS failed_attempts,
    round(failed_attempts / attempts, 4) AS failure_rate
FROM perkamo.webhook_attempts FINAL
WHERE attempt > 0
  AND attempted_at >= {since:DateTime64(3, 'UTC')}
  AND attempted_at < {until:DateTime64(3, 'UTC')}
  AND ({space:String} = '' OR space_slug = {space:String})
GROUP BY space_slug, hour
ORDER BY space_slug, hour
"""

P95_DURATION_PER_SPACE: Final = """
SELECT
    space_slug,
    count() AS attempts,
    quantileExact(0.95)(duration_ms) AS p95_ms,
    max(duration_ms) AS max_ms
FROM perkamo.webhook_attempts FINAL
WHERE attempted_at >= {since:DateTime64(3, 'UTC')}
  AND attempted_at < {until:DateTime64(3, 'UTC')}
  AND ({space:String} = '' OR space_slug = {space:String})
  AND attempt > 0
  AND error_kind NOT IN ('circuit_open', 'endpoint_saturated')
GROUP BY space_slug
ORDER BY p95_ms DESC
"""

STUCK_IN_RETRYING: Final = """
SELECT
    delivery_id,
    any(space_slug) AS space,
    max(attempt) AS last_attempt,
    argMax(status, (attempted_at, attempt)) AS last_status,
    argMax(tuple(next_attempt_at), attempt).1 AS next_attempt_at,
    argMax(error_kind, attempt) AS last_error_kind
FROM perkamo.webhook_attempts FINAL
WHERE ({space:String} = '' OR space_slug = {space:String})
GROUP BY delivery_id
HAVING last_status = 'retrying'
   AND next_attempt_at < now64(3) - INTERVAL {stuck_minutes:UInt32} MINUTE
ORDER BY next_attempt_at
"""

TOP_ERROR_KINDS: Final = """
SELECT
    if(error_kind = '', 'unknown', error_kind) AS kind,
    count() AS attempts,
    uniqExact(delivery_id) AS deliveries,
    uniqExact(space_slug) AS spaces
FROM perkamo.webhook_attempts FINAL
WHERE status != 'delivered'
  AND attempt > 0
  AND attempted_at >= {since:DateTime64(3, 'UTC')}
  AND attempted_at < {until:DateTime64(3, 'UTC')}
  AND ({space:String} = '' OR space_slug = {space:String})
GROUP BY kind
ORDER BY attempts DESC, kind
LIMIT 10
"""

REPLAY_OUTCOMES: Final = """
SELECT
    replay_id,
    uniqExact(delivery_id) AS deliveries,
    countIf(status = 'delivered') AS delivered,
    countIf(status = 'failed') AS failed,
    min(attempted_at) AS started_at
FROM perkamo.webhook_attempts FINAL
WHERE replay_id != ''
  AND attempted_at >= {since:DateTime64(3, 'UTC')}
  AND ({space:String} = '' OR space_slug = {space:String})
GROUP BY replay_id
ORDER BY started_at DESC
"""

README_QUERIES: Final[dict[str, str]] = {
    "failure_rate_per_space_per_hour": FAILURE_RATE_PER_SPACE_PER_HOUR,
    "p95_duration_per_space": P95_DURATION_PER_SPACE,
    "stuck_in_retrying": STUCK_IN_RETRYING,
    "top_error_kinds": TOP_ERROR_KINDS,
    "delivery_history": DELIVERY_ATTEMPTS,
    "replay_outcomes": REPLAY_OUTCOMES,
}
