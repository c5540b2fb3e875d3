"""What the deliver loop knows of its assigned partitions, and the decisions it takes on them.

Pure bookkeeping (no Kafka calls): which partitions are assigned, which offsets are in flight
and which are committable, why a partition is paused, and which pauses and resumes the loop
must apply now. The loop (consumer.service) applies the decisions on the consumer.

A partition is paused while it has at least one reason:
- `due`: a retry message at its head is not due yet (the loop seeked back to it);
- `window`: too many of its messages are handed out and not committable (resumed at half).
Offsets finish out of order; per partition the committable offset is one past the highest
offset below which every message is done (docs/architecture.md, "Offsets").
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from consumer.offsets import OffsetTracker

TP = tuple[str, int]

PAUSE_DUE = "due"
PAUSE_WINDOW = "window"
PAUSE_REASONS = (PAUSE_DUE, PAUSE_WINDOW)


@dataclass(eq=False)
class PartitionState:
    """One assigned partition; dropped on revoke or loss (timers and pauses die with it)."""

    tp: TP
    tracker: OffsetTracker = field(default_factory=OffsetTracker)
    reasons: set[str] = field(default_factory=set)
    due_ms: int = 0
    committed: int | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    revoked: bool = False

    @property
    def paused(self) -> bool:
        return bool(self.reasons)


@dataclass(frozen=True, slots=True)
class PauseChanges:
    """Partitions to pause and to resume now (each listed once, in a stable order)."""

    pause: list[TP]
    resume: list[TP]

    def __bool__(self) -> bool:
        return bool(self.pause or self.resume)


class Partitions:
    """The assigned partitions of one consumer-group member."""

    def __init__(self, window: int) -> None:
        self._window = window
        self._parts: dict[TP, PartitionState] = {}

    def __iter__(self) -> Iterator[PartitionState]:
        return iter(self._parts.values())

    def __len__(self) -> int:
        return len(self._parts)

    def __contains__(self, tp: object) -> bool:
        return tp in self._parts

    def get(self, tp: TP) -> PartitionState | None:
        return self._parts.get(tp)

    def assign(self, tps: Iterable[TP]) -> None:
        """Newly assigned partitions start unpaused, with nothing in flight."""
        for tp in tps:
            self._parts[tp] = PartitionState(tp)

    def take(self, tps: Iterable[TP]) -> list[PartitionState]:
        """Mark partitions revoked (no new work) and return their states; `drop` them later."""
        states = [self._parts[tp] for tp in tps if tp in self._parts]
        for st in states:
            st.revoked = True
        return states

    def drop(self, states: Iterable[PartitionState]) -> None:
        for st in states:
            self._parts.pop(st.tp, None)

    # Pauses --------------------------------------------------------------------------------

    def hold_until_due(self, st: PartitionState, due_ms: int) -> bool:
        """A not-yet-due message heads the partition: True if the partition must pause now."""
        st.due_ms = due_ms
        return _set(st, PAUSE_DUE, True)

    def changes(self, now_ms: int) -> PauseChanges:
        """Re-judge every partition's pause reasons; what to pause and resume now."""
        pause: list[TP] = []
        resume: list[TP] = []
        for st in self._parts.values():
            if st.revoked:
                continue
            before = st.paused
            if PAUSE_DUE in st.reasons and now_ms >= st.due_ms:
                st.reasons.discard(PAUSE_DUE)
            window = st.tracker.window
            if window >= self._window:
                st.reasons.add(PAUSE_WINDOW)
            elif window < self._window // 2:
                st.reasons.discard(PAUSE_WINDOW)
            if st.paused != before:
                (pause if st.paused else resume).append(st.tp)
        return PauseChanges(pause, resume)

    def next_due_ms(self) -> int | None:
        """The earliest due time among partitions paused for one."""
        dues = [st.due_ms for st in self._parts.values() if PAUSE_DUE in st.reasons]
        return min(dues) if dues else None

    def paused_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(PAUSE_REASONS, 0)
        for st in self._parts.values():
            for reason in st.reasons:
                counts[reason] += 1
        return counts

    # Commits ---------------------------------------------------------------------------------

    def committable(self, states: Iterable[PartitionState] | None = None) -> list[tuple[TP, int]]:
        """Per partition, the offset to commit if it moved since the last commit."""
        out = []
        for st in self._parts.values() if states is None else states:
            position = st.tracker.committable()
            if position is not None and position != st.committed:
                out.append((st.tp, position))
        return out

    def committed(self, tp: TP, offset: int) -> None:
        st = self._parts.get(tp)
        if st is not None:
            st.committed = offset


def _set(st: PartitionState, reason: str, on: bool) -> bool:
    """Add or remove a reason; True if the partition went from running to paused."""
    before = st.paused
    if on:
        st.reasons.add(reason)
    else:
        st.reasons.discard(reason)
    return st.paused and not before and not st.revoked
