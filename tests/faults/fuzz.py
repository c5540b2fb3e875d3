"""6. Fuzzed input: hypothesis builds lists of hostile messages; each list is published in one go.

Every message carries an `x-fuzz-id` header (kept on the dead-letter copy) and, when its body
is an envelope, the same id as its event id. An oracle (the service's own parser plus its
attempt-header rule) says where each message must end: the DLQ with a given reason, or a
delivery. Messages with other `perkamo-*` headers may end either way.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import orjson
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from consumer import constants as c
from consumer.errors import InvalidEvent
from consumer.intake import parse_event
from tests.faults.accounting import Accounting
from tests.faults.harness import FUZZ_TAG, FaultEnv, Message, Run, wait_until
from tests.support import make_event, unique

MAX_PAYLOAD = 65536
_ids = itertools.count()

PERKAMO_HEADERS = [
    c.K_ATTEMPT,
    c.K_TRIGGER,
    c.K_REPLAY_ID,
    c.K_DUE_MS,
    c.K_FIRST_FAILED_MS,
    c.K_ERROR_KIND,
    c.K_STATUS_CODE,
    c.K_DLQ_REASON,
]
# Out-of-range origin headers and malformed delivery ids have their own regression tests
# (test_header_validation.py); the general fuzz keeps those headers well-formed.
ORIGIN_HEADERS = [c.K_ORIGIN_TOPIC, c.K_ORIGIN_PARTITION, c.K_ORIGIN_OFFSET]
PINNED = {c.K_DELIVERY_ID, *ORIGIN_HEADERS}
NASTY_VALUES = [
    b"",
    b"0",
    b"1",
    b"-1",
    b"2",
    b"10000",
    b"10001",
    b" 3 ",
    b"1_0",
    b"\r\n",
    b"\x00",
    b"\xff\xfe",
    b"1e3",
    b"\xd9\xa5",
    b"NaN",
    b"9" * 30,
    b"a" * 300,
]
NASTY_FRAGMENTS = [
    b'"\\ud800"',
    b'"\\udc00\\ud800"',
    b'"\xff\xfe"',
    b'"\xc0\xaf"',
    b'"\xed\xa0\x80"',
    b'"\\u0000"',
    b'"\xe2\x80\xae rtl"',
    b'"\xef\xbb\xbf"',
    b"NaN",
    b"Infinity",
    b"1e999",
    b"-0",
    b"123456789012345678901234567890",
    b'"' + "\U0001f600".encode() * 100 + b'"',
    b"null",
    b'"a\\"b"',
    b"[]",
    b"{}",
    b'"\\/\\b\\f\\n\\r\\t"',
]
PATHS = [
    ("id",),
    ("type",),
    ("created_at",),
    ("data",),
    ("data", "space"),
    ("data", "space", "slug"),
    ("data", "space", "environment"),
    ("data", "user_id"),
    ("data", "transaction_id"),
    ("data", "event"),
    ("data", "status"),
    ("data", "occurred_at"),
    ("data", "context"),
    ("data", "delta"),
    ("data", "effects"),
    ("data", "wallet_state"),
    ("data", "space", "name"),
]

text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    text,
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(text, inner, max_size=4)),
    max_leaves=12,
)
header_value = st.one_of(st.sampled_from(NASTY_VALUES), st.binary(max_size=40))
garbage_header = st.tuples(
    st.one_of(st.sampled_from(PERKAMO_HEADERS), text.filter(lambda n: n not in PINNED)), header_value
)
in_range = st.integers(-(2**31), 2**31 - 1).map(lambda n: str(n).encode())
well_formed_header = st.one_of(
    st.tuples(st.sampled_from(ORIGIN_HEADERS), in_range),
    st.tuples(st.just(c.K_DELIVERY_ID), st.just(b"")),  # filled in with an id unique to the message
)


def _set(doc: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = doc
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            return
        node = node[part]
    node[path[-1]] = value


@st.composite
def fuzz_message(draw: st.DrawFn, space: str) -> tuple[bytes | None, list[tuple[str, bytes]], str]:
    """(value, headers, tag): one hostile message for Space `space`."""
    tag = f"fz_{unique('m').split('-')[1]}_{next(_ids)}"
    doc = make_event(space, 0)
    doc["id"] = tag
    kind = draw(
        st.sampled_from(["bytes", "deep", "huge", "types", "unicode", "fragment", "headers", "valid"])
    )
    value: bytes | None
    if kind == "bytes":
        value = draw(
            st.one_of(st.none(), st.binary(max_size=300), st.sampled_from([b"", b"{}", b"[]", b"null"]))
        )
    elif kind == "deep":
        depth = draw(st.integers(1, 1500))
        if draw(st.booleans()):
            value = b"[" * depth + b"]" * depth
        else:
            value = orjson.dumps(doc).replace(
                b'"context":{', b'"context":{"d":' + b'{"d":' * depth + b"1" + b"}" * depth + b",", 1
            )
    elif kind == "huge":
        doc["data"]["context"] = {"blob": "x" * draw(st.integers(MAX_PAYLOAD - 2000, MAX_PAYLOAD * 3))}
        value = orjson.dumps(doc)
    elif kind == "types":
        path = draw(st.sampled_from(PATHS))
        _set(doc, path, draw(json_value.filter(lambda v: not isinstance(v, str))))
        value = orjson.dumps(doc)
    elif kind == "unicode":
        path = draw(st.sampled_from(PATHS[1:]))  # the id stays the tag
        _set(doc, path, draw(text))
        value = orjson.dumps(doc)
    elif kind == "fragment":
        field = draw(st.sampled_from(["user_id", "name", "status", "transaction_id"]))
        (doc["data"]["space"] if field == "name" else doc["data"])[field] = "__FUZZ__"
        value = orjson.dumps(doc).replace(b'"__FUZZ__"', draw(st.sampled_from(NASTY_FRAGMENTS)))
        if draw(st.booleans()):
            value = draw(st.sampled_from([b"\xef\xbb\xbf", b" ", b"\n", b""])) + value
    else:
        value = orjson.dumps(doc)
    headers: list[tuple[str, bytes]] = []
    if kind in ("headers", "valid", "types", "unicode") and draw(st.booleans()):
        headers = draw(st.lists(st.one_of(garbage_header, well_formed_header), max_size=4))
        headers = [(k, f"dlv_{tag}".encode() if k == c.K_DELIVERY_ID else v) for k, v in headers]
    headers.append((FUZZ_TAG, tag.encode()))
    return value, headers, tag


def oracle(value: bytes | None, headers: list[tuple[str, bytes]]) -> tuple[str, str]:
    """(expect, reason) for a message, by the service's own rules."""
    try:
        parse_event(value, MAX_PAYLOAD)
    except InvalidEvent as exc:
        return "dlq", exc.reason
    # perkamo-* headers on an events topic are ignored (consumer.headers.untrusted_meta): any
    # event that parses is delivered, as attempt 1 under its natural delivery id.
    return "deliver", ""


def fuzz_inputs(env: FaultEnv, examples: int = 3, max_size: int = 25, seed: int | None = None) -> Accounting:
    """Publish `examples` hypothesis-built lists; after each, check each message's fate."""
    run = Run(env, "fuzz")
    try:
        rec = run.receiver({"/ok": {"mode": "ok"}})
        space = unique("fuzz").lower()
        proc = run.consumer(
            run.endpoints_file({space: rec.url("/ok")}),
            max_payload_bytes=MAX_PAYLOAD,
            history_flush_interval_s=0.3,
            commit_interval_s=0.5,
        )
        batches: list[int] = []

        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            derandomize=seed is not None,
            suppress_health_check=list(HealthCheck),
            phases=(Phase.generate,),
        )
        @given(st.lists(fuzz_message(space), min_size=max(1, max_size // 2), max_size=max_size))
        def publish_and_check(messages: list[tuple[bytes | None, list[tuple[str, bytes]], str]]) -> None:
            out = []
            for value, headers, tag in messages:
                expect, reason = oracle(value, headers)
                out.append(Message(tag, value, headers, 1, expect, reason))
            run.publisher.publish(out)
            batches.append(len(out))
            tags = {m.key for m in out}

            def accounted() -> bool:
                if not proc.alive():
                    raise AssertionError(f"the consumer died:\n{proc.log_tail()}")
                delivered = {r.event_id for r in run.receipts() if r.ok}
                return tags <= delivered | set(run.dead_letters())

            wait_until(accounted, 90, "every fuzzed message delivered or dead-lettered", interval=0.5)

        started = time.monotonic()
        publish_and_check()
        result = run.finish(settle_timeout=90)
        result.notes.append(
            f"{len(batches)} hypothesis lists ({sum(batches)} messages) in {time.monotonic() - started:.0f}s"
        )
        return result
    finally:
        run.cleanup()
