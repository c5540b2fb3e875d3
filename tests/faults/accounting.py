"""The accounting invariant every fault scenario ends with: nothing lost, duplicates bounded.

`evaluate()` is pure: it takes what the scenario published, what the receivers saw, what
reached the dead-letter topic, the history rows and the group's offsets, and returns an
`Accounting` record. `Accounting.problems()` lists every broken rule; an empty list is a pass:

1. every published event is delivered (a 2xx seen by a receiver) or dead-lettered with a reason;
2. every attempt a receiver saw has a history row (delivery_id, attempt) after FINAL, and no
   row claims an HTTP answer the receivers never gave;
3. every request for one event carries one x-perkamo-delivery (duplicates included);
4. duplicate deliveries stay within the allowance: per kill (or broker restart), the messages
   at or past the group's committed offset whose attempt had already reached a receiver —
   exactly what a restart may redeliver (docs/architecture.md, offsets);
5. nothing is left uncommitted on the events topic, and every consumer exited 0 on SIGTERM;
6. every delivery's newest history row is terminal (delivered or failed), none left
   "retrying" or "held";
7. every delivery's attempt numbers are gapless: its attempt rows (attempt >= 1, each a call
   made) run from its first number to its last without a hole — an open circuit or a
   saturated endpoint holds a delivery, it never skips a number. Hold records (attempt 0) are
   not attempts and are left out of rules 2 and 7.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

# History rows that may exist without a receiver seeing a request: no HTTP exchange happened,
# or the client gave up before the server read it.
NO_EXCHANGE = frozenset({"connect_error", "tls_error", "blocked_address", "timeout"})
TERMINAL = frozenset({"delivered", "failed"})
SAMPLE = 5


@dataclass(frozen=True)
class Published:
    """One message the scenario put on its events topic; `key` is the event id (or a fuzz tag)."""

    key: str
    topic: str
    partition: int
    offset: int
    attempt: int = 1
    expect: str = "either"  # "deliver", "dlq" or "either"
    reason: str = ""  # the expected DLQ reason, when known


@dataclass(frozen=True)
class Receipt:
    t: float
    path: str
    delivery: str
    attempt: str
    event_id: str
    status: int
    certain: bool
    action: str = ""

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Receipt:
        return cls(
            doc["t"],
            doc["path"],
            doc["delivery"],
            str(doc["attempt"]),
            doc["event_id"],
            int(doc["status"]),
            bool(doc["certain"]),
            doc.get("action", ""),
        )

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


@dataclass(frozen=True)
class DeadLetter:
    key: str
    reason: str
    topic: str = ""
    partition: int = 0
    offset: int = 0


@dataclass(frozen=True)
class HistoryRow:
    delivery_id: str
    attempt: int
    event_id: str
    status: str
    error_kind: str
    at_ms: int = 0  # attempted_at


@dataclass(frozen=True)
class InputMessage:
    """A message the consumer group reads (events or retry topic) that belongs to the scenario."""

    topic: str
    partition: int
    offset: int
    key: str
    attempt: int


@dataclass(frozen=True)
class Disruption:
    """A kill -9 (or broker restart): the group's committed offsets right after it, and the time
    until which attempts count as already made (they may be redelivered)."""

    kind: str
    at: float
    committed: dict[tuple[str, int], int]


@dataclass
class Accounting:
    """The result of one scenario (one row of the soak table)."""

    scenario: str
    events: int
    delivered: int
    dead_lettered: int
    lost: int
    duplicate_deliveries: int
    max_duplicates_allowed: int
    history_missing: int
    history_extra: int
    wall_time_s: float
    in_flight_bound: int | None = None
    duplicate_attempts: int = 0
    attempts_seen: int = 0
    history_rows: int = 0
    history_not_terminal: int = 0
    attempt_gaps: int = 0
    delivery_id_conflicts: int = 0
    dlq_without_reason: int = 0
    expectation_mismatches: int = 0
    uncommitted: dict[str, int] = field(default_factory=dict)
    exit_codes: list[int] = field(default_factory=list)
    extra_problems: list[str] = field(default_factory=list)
    samples: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        out = []
        if self.lost:
            out.append(f"{self.lost} events neither delivered nor dead-lettered: {self.samples.get('lost')}")
        if self.duplicate_deliveries > self.max_duplicates_allowed:
            out.append(
                f"{self.duplicate_deliveries} duplicate deliveries > {self.max_duplicates_allowed} allowed: "
                f"{self.samples.get('duplicates')}"
            )
        if self.history_missing:
            out.append(
                f"{self.history_missing} attempts seen by receivers have no history row: "
                f"{self.samples.get('history_missing')}"
            )
        if self.history_extra:
            out.append(
                f"{self.history_extra} history rows claim an HTTP answer no receiver gave: "
                f"{self.samples.get('history_extra')}"
            )
        if self.history_not_terminal:
            out.append(
                f"{self.history_not_terminal} deliveries end on a non-terminal history row: "
                f"{self.samples.get('not_terminal')}"
            )
        if self.attempt_gaps:
            out.append(
                f"{self.attempt_gaps} deliveries have a gap in their attempt numbers: "
                f"{self.samples.get('gaps')}"
            )
        if self.delivery_id_conflicts:
            out.append(
                f"{self.delivery_id_conflicts} events reached receivers under several delivery ids: "
                f"{self.samples.get('conflicts')}"
            )
        if self.dlq_without_reason:
            out.append(f"{self.dlq_without_reason} dead letters without a reason header")
        if self.expectation_mismatches:
            out.append(
                f"{self.expectation_mismatches} messages ended other than expected: "
                f"{self.samples.get('mismatches')}"
            )
        if self.uncommitted:
            out.append(f"uncommitted events-topic offsets (end - committed): {self.uncommitted}")
        if any(code != 0 for code in self.exit_codes):
            out.append(f"consumer exit codes on SIGTERM: {self.exit_codes}")
        return out + self.extra_problems

    @property
    def ok(self) -> bool:
        return not self.problems()

    def explain(self) -> str:
        head = (
            f"[{self.scenario}] events={self.events} delivered={self.delivered} "
            f"dead_lettered={self.dead_lettered} lost={self.lost} duplicates={self.duplicate_deliveries}"
            f"/{self.max_duplicates_allowed} (in-flight bound {self.in_flight_bound}) "
            f"dup_attempts={self.duplicate_attempts} history missing/extra="
            f"{self.history_missing}/{self.history_extra} wall={self.wall_time_s:.1f}s"
        )
        lines = [head, *(f"  note: {n}" for n in self.notes), *(f"  PROBLEM: {p}" for p in self.problems())]
        return "\n".join(lines)

    def row(self) -> list[str]:
        allowed = str(self.max_duplicates_allowed)
        if self.in_flight_bound is not None:
            allowed += f" (in-flight×kills {self.in_flight_bound})"
        return [
            self.scenario,
            str(self.events),
            str(self.delivered),
            str(self.dead_lettered),
            str(self.lost),
            str(self.duplicate_deliveries),
            allowed,
            f"{self.history_missing}/{self.history_extra}",
            f"{self.wall_time_s:.0f}s",
            "ok" if self.ok else "FAIL",
        ]


def redelivery_allowance(
    disruptions: Sequence[Disruption],
    inputs: Iterable[InputMessage],
    receipts: Sequence[Receipt],
    grace_s: float = 3.0,
) -> int:
    """How many messages the disruptions may have redelivered after their attempt reached a
    receiver: at or past the committed offset, attempted before the disruption (+ a grace for
    requests still on the wire or slow to be recorded; a restarted member takes longer than
    that to be assigned anything). Each can cause at most one extra delivery."""
    first_seen: dict[tuple[str, str], float] = {}
    for r in receipts:
        pair = (r.event_id, r.attempt)
        if pair not in first_seen or r.t < first_seen[pair]:
            first_seen[pair] = r.t
    inputs = list(inputs)
    total = 0
    for d in disruptions:
        for m in inputs:
            seen = first_seen.get((m.key, str(m.attempt)))
            if (
                seen is not None
                and seen <= d.at + grace_s
                and m.offset >= d.committed.get((m.topic, m.partition), 0)
            ):
                total += 1
    return total


def evaluate(
    scenario: str,
    published: Sequence[Published],
    receipts: Sequence[Receipt],
    dead_letters: Sequence[DeadLetter],
    history: Sequence[HistoryRow],
    committed: dict[tuple[str, int], int],
    ends: dict[tuple[str, int], int],
    exit_codes: Sequence[int],
    wall_time_s: float,
    disruptions: Sequence[Disruption] = (),
    inputs: Sequence[InputMessage] = (),
    max_in_flight: int | None = None,
    extra_allowed: int = 0,
) -> Accounting:
    keys = {p.key for p in published}
    statuses: dict[tuple[str, str], set[str]] = defaultdict(set)
    kinds: dict[tuple[str, str], set[str]] = defaultdict(set)
    newest: dict[str, HistoryRow] = {}
    numbers: dict[str, set[int]] = defaultdict(set)
    for h in history:
        mine = newest.get(h.delivery_id)
        if mine is None or (h.at_ms, h.attempt) > (mine.at_ms, mine.attempt):
            newest[h.delivery_id] = h
        if h.attempt == 0:  # a hold record: not an attempt
            continue
        statuses[(h.delivery_id, str(h.attempt))].add(h.status)
        kinds[(h.delivery_id, str(h.attempt))].add(h.error_kind)
        numbers[h.delivery_id].add(h.attempt)

    # 1. delivered or dead-lettered
    effective = [
        r
        for r in receipts
        if r.ok and (r.certain or "delivered" in statuses.get((r.delivery, r.attempt), ()))
    ]
    deliveries = Counter(r.event_id for r in effective if r.event_id in keys)
    delivered = set(deliveries)
    dlq_keys = {d.key for d in dead_letters if d.key in keys}
    lost = sorted(keys - delivered - dlq_keys)
    duplicates = {k: n - 1 for k, n in deliveries.items() if n > 1}

    # 2. history rows for every attempt seen, and none claiming answers nobody gave
    seen_pairs = Counter((r.delivery, r.attempt) for r in receipts if r.event_id in keys)
    missing = sorted(p for p in seen_pairs if p not in statuses)
    extra = sorted(p for p in statuses if p not in seen_pairs and not kinds[p] <= NO_EXCHANGE)

    # 3. one delivery id per event
    ids: dict[str, set[str]] = defaultdict(set)
    for r in receipts:
        if r.event_id in keys:
            ids[r.event_id].add(r.delivery)
    conflicts = sorted(k for k, v in ids.items() if len(v) > 1)

    # 6. terminal newest rows
    not_terminal = sorted(d for d, row in newest.items() if row.status not in TERMINAL)

    # 7. gapless attempt numbers
    gaps = sorted(d for d, ns in numbers.items() if len(ns) != max(ns) - min(ns) + 1)

    # expectations (fuzz): a message expected in the DLQ must be there with its reason
    reasons: dict[str, set[str]] = defaultdict(set)
    for d in dead_letters:
        reasons[d.key].add(d.reason)
    mismatches = []
    for p in published:
        if p.expect == "dlq" and (p.key not in dlq_keys or (p.reason and p.reason not in reasons[p.key])):
            mismatches.append(
                f"{p.key}: expected DLQ {p.reason or ''}, got {sorted(reasons[p.key]) or 'none'}"
            )
        if p.expect == "deliver" and p.key not in delivered:
            mismatches.append(f"{p.key}: expected delivery, got DLQ {sorted(reasons[p.key])}")

    topics = {p.topic for p in published}
    uncommitted = {
        f"{t}[{p}]": end - max(committed.get((t, p), 0), 0)
        for (t, p), end in ends.items()
        if t in topics and max(committed.get((t, p), 0), 0) < end
    }

    allowance = extra_allowed + redelivery_allowance(disruptions, inputs, receipts)
    kills = sum(1 for d in disruptions if d.kind == "kill")
    result = Accounting(
        scenario=scenario,
        events=len(keys),
        delivered=len(delivered),
        dead_lettered=len(dlq_keys),
        lost=len(lost),
        duplicate_deliveries=sum(duplicates.values()),
        max_duplicates_allowed=allowance,
        history_missing=len(missing),
        history_extra=len(extra),
        wall_time_s=wall_time_s,
        in_flight_bound=max_in_flight * kills if max_in_flight is not None and kills else None,
        duplicate_attempts=sum(n - 1 for n in seen_pairs.values()),
        attempts_seen=sum(seen_pairs.values()),
        history_rows=len(statuses),
        history_not_terminal=len(not_terminal),
        attempt_gaps=len(gaps),
        delivery_id_conflicts=len(conflicts),
        dlq_without_reason=sum(1 for d in dead_letters if d.key in keys and not d.reason),
        expectation_mismatches=len(mismatches),
        uncommitted=uncommitted,
        exit_codes=list(exit_codes),
        samples={
            "lost": lost[:SAMPLE],
            "duplicates": sorted(duplicates)[:SAMPLE],
            "history_missing": [f"{d}#{a}" for d, a in missing[:SAMPLE]],
            "history_extra": [f"{d}#{a}:{sorted(kinds[(d, a)])}" for d, a in extra[:SAMPLE]],
            "not_terminal": not_terminal[:SAMPLE],
            "gaps": [f"{d}:{sorted(numbers[d])}" for d in gaps[:SAMPLE]],
            "conflicts": conflicts[:SAMPLE],
            "mismatches": mismatches[:SAMPLE],
        },
    )
    if result.in_flight_bound is not None and result.duplicate_deliveries > result.in_flight_bound:
        result.notes.append(
            f"{result.duplicate_deliveries} duplicates exceed max_in_flight x kills "
            f"({result.in_flight_bound}): the uncommitted window at a kill is wider than the in-flight cap"
        )
    both = len(delivered & dlq_keys)
    if both:
        result.notes.append(
            f"{both} events both delivered and dead-lettered (a redelivered duplicate took another path, "
            "or a 2xx the consumer did not see)"
        )
    unseen = len(statuses) - len(seen_pairs.keys() & statuses.keys())
    if unseen:
        result.notes.append(
            f"{unseen} attempt rows without a receiver request (timeout, connect, TLS)"
        )
    return result


def assert_accounted(result: Accounting) -> None:
    """Fail a test with the whole record when any rule is broken (printed either way)."""
    print(result.explain())
    assert result.ok, result.explain()
