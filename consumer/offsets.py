"""Out-of-order completion -> the offset that is safe to commit, per partition.

See docs/architecture.md (offsets).
"""

from __future__ import annotations

from collections import deque


class OffsetTracker:
    """Offsets handed out in increasing order, finished in any order.

    `committable()` is one past the highest offset below which everything is finished:
    committing it never passes an unfinished message.
    """

    __slots__ = ("_done", "_next_commit", "_pending")

    def __init__(self) -> None:
        self._pending: deque[int] = deque()
        self._done: set[int] = set()
        self._next_commit: int | None = None

    def add(self, offset: int) -> None:
        if self._pending and offset <= self._pending[-1]:
            raise ValueError(f"offset {offset} not after {self._pending[-1]}")
        if not self._pending and self._next_commit is not None and offset < self._next_commit:
            raise ValueError(f"offset {offset} before the committable {self._next_commit}")
        self._pending.append(offset)

    def done(self, offset: int) -> None:
        self._done.add(offset)
        pending, done = self._pending, self._done
        while pending and pending[0] in done:
            finished = pending.popleft()
            done.discard(finished)
            self._next_commit = finished + 1

    def committable(self) -> int | None:
        """The offset to commit (next to read), or None if nothing finished yet."""
        return self._next_commit

    @property
    def window(self) -> int:
        """Messages handed out and not yet committable (finished or not)."""
        return len(self._pending)

    @property
    def unfinished(self) -> int:
        return len(self._pending) - len(self._done)
