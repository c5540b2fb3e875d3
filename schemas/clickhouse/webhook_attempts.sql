-- perkamo.webhook_attempts: one row per delivery attempt (docs/analysts.md, docs/attempts.md).
-- Applied by `perkamo-webhooks migrate` (re-runnable). {ttl_days} is PERKAMO_HISTORY_TTL_DAYS.
--
-- Attempt 0 is not a call: it is the delivery's hold record (status `held` while an open
-- circuit holds it, `failed` if its schedule's span ran out while held), one per delivery,
-- with `pending_attempt` the number of the attempt it waits to make.
--
-- Idempotent writes: a crash or replay of the same Kafka offset can write an attempt row
-- twice. ReplacingMergeTree keeps one row per sorting key (space_slug, delivery_id, attempt),
-- the latest by written_at, when parts merge; every query the project offers reads with
-- FINAL so duplicates never count before a merge either.
-- ORDER BY starts with space_slug: "this Space's attempts" reads one key range; the time
-- range prunes month partitions and the minmax index; status has a set index; lookups by
-- delivery id, event id or transaction id alone (the console's search) use bloom filters.
--
-- Tracing and network timings (added later; `migrate` adds them to an older table, where old
-- rows read '' and NULL): trace_id/span_id are the attempt's OpenTelemetry span; dns_ms,
-- connect_ms, tls_ms and ttfb_ms where its time went (0 = a step a kept-alive connection
-- skipped, NULL = not measured or not reached); cert_not_after the endpoint certificate's
-- expiry when the attempt opened a new TLS connection.
--
-- A cut body (added later, the same way): request_body_truncated says request_body holds only
-- the first bytes of the POSTed body (the attempt record has a size budget, consumer.attempts);
-- request_body_bytes and request_body_sha256 are then the whole body's length and SHA-256,
-- which a resend checks the original against (consumer.originals). Older rows read false, 0, ''.
CREATE TABLE IF NOT EXISTS perkamo.webhook_attempts
(
    delivery_id       String,
    attempt           UInt16,
    event_id          String,
    event_type        LowCardinality(String),
    space_slug        LowCardinality(String),
    environment       LowCardinality(String),
    endpoint_id       String,
    endpoint_host     String,
    user_id           String,
    transaction_id    String,
    trigger           LowCardinality(String),
    status            LowCardinality(String),
    status_code       UInt16,
    status_text       String,
    duration_ms       UInt32,
    error             String,
    error_kind        LowCardinality(String),
    attempted_at      DateTime64(3, 'UTC'),
    next_attempt_at   Nullable(DateTime64(3, 'UTC')),
    request_body      String CODEC(ZSTD(3)),
    response_excerpt  String CODEC(ZSTD(3)),
    source_topic      LowCardinality(String),
    source_partition  Int32,
    source_offset     Int64,
    replay_id         String,
    pending_attempt   UInt16 DEFAULT 0,
    trace_id          String DEFAULT '',
    span_id           String DEFAULT '',
    dns_ms            Nullable(UInt32),
    connect_ms        Nullable(UInt32),
    tls_ms            Nullable(UInt32),
    ttfb_ms           Nullable(UInt32),
    connection_reused Nullable(Bool),
    cert_not_after    Nullable(DateTime64(3, 'UTC')),
    request_body_truncated Bool DEFAULT false,
    request_body_bytes     UInt32 DEFAULT 0,
    request_body_sha256    String DEFAULT '',
    written_at        DateTime64(3, 'UTC') DEFAULT now64(3),
    INDEX idx_delivery_id delivery_id TYPE bloom_filter(0.01) GRANULARITY 4,
    INDEX idx_event_id event_id TYPE bloom_filter(0.01) GRANULARITY 4,
    INDEX idx_transaction_id transaction_id TYPE bloom_filter(0.01) GRANULARITY 4,
    INDEX idx_trace_id trace_id TYPE bloom_filter(0.01) GRANULARITY 4,
    INDEX idx_attempted_at attempted_at TYPE minmax GRANULARITY 1,
    INDEX idx_status status TYPE set(8) GRANULARITY 4
)
ENGINE = ReplacingMergeTree(written_at)
PARTITION BY toYYYYMM(attempted_at)
ORDER BY (space_slug, delivery_id, attempt)
TTL toDateTime(attempted_at) + INTERVAL {ttl_days} DAY
SETTINGS index_granularity = 8192
