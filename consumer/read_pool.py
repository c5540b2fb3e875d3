"""The history reads' pool: one bounded thread pool and slot counter shared by the history API
and the console, so a flood of console pages gets 429s instead of the store (docs/security.md)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

from consumer.errors import Busy

T = TypeVar("T")


class ReadPool:
    """The bounded thread pool and slot counter every history read of the API and the console
    runs on: at most `slots` reads at once (PERKAMO_HISTORY_MAX_CONCURRENT_QUERIES), more are
    Busy at once (429), never queued. The store's client blocks, so reads run on this pool and
    the loop's default executor stays free for /metrics and the rest.

    A read may name shares it counts against: (key, most at once). The console gives each of
    its reads the console's share (all slots but one, so the API always finds one) and its
    session's (one at a time), so one link flooding pages gets 429 pages, not the store."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._busy = 0
        self._held: dict[str, int] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(slots, thread_name_prefix="history-read")

    @property
    def busy(self) -> int:
        return self._busy

    @contextlib.asynccontextmanager
    async def slot(self, shares: Sequence[tuple[str, int]] = ()) -> AsyncIterator[None]:
        """One place (and one of each share's), or Busy at once."""
        if self._busy >= self.slots:
            raise Busy(f"{self._busy} history queries are running "
                       "(PERKAMO_HISTORY_MAX_CONCURRENT_QUERIES); retry in a moment")
        for key, most in shares:
            if self._held.get(key, 0) >= most:
                raise Busy("this session's earlier history queries are still running; "
                           "retry in a moment")
        self._busy += 1
        for key, _ in shares:
            self._held[key] = self._held.get(key, 0) + 1
        try:
            yield
        finally:
            self._busy -= 1
            for key, _ in shares:
                left = self._held[key] - 1
                if left:
                    self._held[key] = left
                else:
                    del self._held[key]

    async def run(
        self, fn: Callable[..., T], *args: Any, shares: Sequence[tuple[str, int]] = ()
    ) -> T:
        """Run a blocking read on the pool, within a place."""
        async with self.slot(shares):
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
