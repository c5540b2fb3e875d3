"""W3C Trace Context values (`traceparent`, `tracestate`): parsed, checked and written (pure).

A delivery's trace context travels in Kafka headers (the event's own, then the retry, held and
DLQ messages this service writes) and in the attempt record (`trace_id`, `span_id`), so every
attempt of a delivery, resends and replays included, is a span of the same trace
(consumer.tracing). The values come from outside the service, so only well-formed ones are
taken; a malformed one is ignored (a new trace starts), as the W3C recommendation says, and
never dead-letters an event.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Final

TRACEPARENT: Final = "traceparent"
TRACESTATE: Final = "tracestate"

_PARENT_RE: Final = re.compile(rb"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
# A future version may append fields after the four of version 00 (W3C: read the first four).
_FUTURE_RE: Final = re.compile(
    rb"(?!ff|00)[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(?:-[ -~]*)?"
)
_STATE_RE: Final = re.compile(rb"[ -~]{1,512}")  # printable ASCII, the recommended 512 bytes
_ZERO_TRACE: Final = "0" * 32
_ZERO_SPAN: Final = "0" * 16
_HEX_ID_RE: Final = re.compile(r"[0-9a-f]{32}")
_HEX_SPAN_RE: Final = re.compile(r"[0-9a-f]{16}")
SAMPLED: Final = 1

_random = random.Random()  # noqa: S311 - ids need to be unique, not secret (as the SDK's own)


@dataclass(frozen=True, slots=True)
class TraceContext:
    """One span's place in a trace: 32 and 16 lower-case hex digits, the flags, the vendor state."""

    trace_id: str
    span_id: str
    flags: int = 0
    state: str = ""

    @property
    def sampled(self) -> bool:
        return bool(self.flags & SAMPLED)

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags:02x}"

    def headers(self) -> list[tuple[str, bytes]]:
        """The Kafka headers that carry this context on."""
        out = [(TRACEPARENT, self.traceparent.encode())]
        if self.state:
            out.append((TRACESTATE, self.state.encode()))
        return out


def parse(traceparent: bytes | None, tracestate: bytes | None = None) -> TraceContext | None:
    """The context of a `traceparent` header (and its `tracestate`); None when absent or not
    well-formed (an all-zero id is invalid too)."""
    if not traceparent:
        return None
    value = traceparent.strip()
    match = _PARENT_RE.fullmatch(value) or _FUTURE_RE.fullmatch(value)
    if match is None:
        return None
    trace_id, span_id = match.group(1).decode(), match.group(2).decode()
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    state = ""
    if tracestate and _STATE_RE.fullmatch(tracestate.strip()):
        state = tracestate.strip().decode()
    return TraceContext(trace_id, span_id, int(match.group(3), 16) & 0xFF, state)


def of_ids(trace_id: str, span_id: str, flags: int = SAMPLED) -> TraceContext | None:
    """The context of ids read back from an attempt record (a resend or replay continues the
    trace of the delivery's latest attempt); None when they are not valid ids."""
    if not _HEX_ID_RE.fullmatch(trace_id) or not _HEX_SPAN_RE.fullmatch(span_id):
        return None
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return TraceContext(trace_id, span_id, flags)


def new_span_id() -> str:
    return f"{_random.getrandbits(64) or 1:016x}"


def new_trace_id() -> str:
    return f"{_random.getrandbits(128) or 1:032x}"


def child_of(parent: TraceContext | None) -> TraceContext:
    """A context for a span that is not recorded (tracing off): a child of `parent`, or the root
    of a new, unsampled trace. Its ids still go into the attempt record and, with
    PERKAMO_TRACE_PROPAGATION, to the receiver."""
    if parent is None:
        return TraceContext(new_trace_id(), new_span_id(), 0)
    return TraceContext(parent.trace_id, new_span_id(), parent.flags, parent.state)
