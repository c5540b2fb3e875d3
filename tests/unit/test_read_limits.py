"""The history read places (read_pool.ReadPool) and the console's action limit: at the limit, one
past it, and freed again."""

from __future__ import annotations

import asyncio

import pytest

from consumer.console.base import ACTION_WINDOW_S, ACTIONS_PER_WINDOW, ActionLimit
from consumer.errors import Busy
from consumer.read_pool import ReadPool


async def test_places_and_shares_are_counted_and_freed():
    pool = ReadPool(3)
    console = [("console", 2)]
    try:
        async with pool.slot([*console, ("space:a", 1)]):
            with pytest.raises(Busy, match="this session"):  # the Space's one place is taken
                async with pool.slot([*console, ("space:a", 1)]):
                    pass
            async with pool.slot([*console, ("space:b", 1)]):  # the console's second place
                with pytest.raises(Busy):  # the console's share is full; the API's place is not
                    async with pool.slot([*console, ("space:c", 1)]):
                        pass
                async with pool.slot():  # the API's read: the last place
                    assert pool.busy == 3
                    with pytest.raises(Busy, match="PERKAMO_HISTORY_MAX_CONCURRENT_QUERIES"):
                        async with pool.slot():
                            pass
        assert pool.busy == 0
        assert await pool.run(lambda x: x + 1, 1, shares=[*console, ("space:a", 1)]) == 2
    finally:
        pool.close()


async def test_a_failed_read_frees_its_place():
    pool = ReadPool(1)

    def boom() -> None:
        raise RuntimeError("store down")

    try:
        with pytest.raises(RuntimeError):
            await pool.run(boom)
        assert pool.busy == 0
        await asyncio.wait_for(pool.run(lambda: None), 5)
    finally:
        pool.close()


def test_the_action_limit_at_and_past_its_limit_and_after_its_window():
    limit = ActionLimit()
    for n in range(ACTIONS_PER_WINDOW):
        assert limit.take("space:a", now=100.0 + n) == 0.0
    wait = limit.take("space:a", now=100.0 + ACTIONS_PER_WINDOW)
    assert 0 < wait <= ACTION_WINDOW_S
    assert limit.take("space:b", now=110.0) == 0.0  # another owner has its own allowance
    assert limit.take("space:a", now=100.0 + ACTION_WINDOW_S + 0.5) == 0.0  # the first one expired
