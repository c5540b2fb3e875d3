"""Which perkamo-* headers the deliver role believes: only those on topics it alone writes."""

from __future__ import annotations

from consumer import constants as c
from consumer.headers import read_meta, untrusted_meta
from consumer.tracecontext import TRACEPARENT

FORGED = {
    c.K_DELIVERY_ID: b"dlv_of_another_space",
    c.K_ATTEMPT: b"10000",
    c.K_RUN_ATTEMPT: b"10000",
    c.K_TRIGGER: b"resend",
    c.K_REPLAY_ID: b"rpl_x",
    c.K_ORIGIN_TOPIC: b"perkamo.events",
    c.K_ORIGIN_OFFSET: b"99999999999999999999",  # past Int64: would break history if believed
    TRACEPARENT: b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
}


def test_an_events_topic_message_gets_a_fresh_delivery_whatever_its_headers_say() -> None:
    meta = untrusted_meta(FORGED)
    fields = (meta.attempt, meta.run_attempt, meta.delivery_id, meta.trigger, meta.replay_id)
    assert fields == (1, 1, "", "", "")
    assert meta.origin is None and meta.run_started_ms is None
    assert meta.trace is not None  # the producer's W3C trace context is still followed


def test_the_same_headers_on_the_services_own_topic_are_read() -> None:
    meta = read_meta({k: v for k, v in FORGED.items() if k != c.K_ORIGIN_OFFSET})
    assert (meta.attempt, meta.delivery_id, meta.trigger) == (10000, "dlv_of_another_space", "resend")
