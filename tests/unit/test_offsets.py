"""consumer.offsets.OffsetTracker: commit the highest contiguous finished offset.

See docs/architecture.md (offsets).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.offsets import OffsetTracker


def tracker_with(*offsets: int) -> OffsetTracker:
    tracker = OffsetTracker()
    for offset in offsets:
        tracker.add(offset)
    return tracker


def test_nothing_committable_before_anything_finishes() -> None:
    tracker = tracker_with(0, 1, 2)
    assert tracker.committable() is None


def test_out_of_order_completion_commits_highest_contiguous() -> None:
    tracker = tracker_with(10, 11, 12, 13)
    tracker.done(12)
    assert tracker.committable() is None
    tracker.done(10)
    assert tracker.committable() == 11
    tracker.done(13)
    assert tracker.committable() == 11  # 11 still unfinished
    tracker.done(11)
    assert tracker.committable() == 14


def test_gaps_in_offsets_are_skipped() -> None:
    # Compaction and transaction markers leave holes; only handed-out offsets count.
    tracker = tracker_with(5, 9, 20)
    tracker.done(9)
    tracker.done(5)
    assert tracker.committable() == 10
    tracker.done(20)
    assert tracker.committable() == 21


def test_window_and_unfinished() -> None:
    tracker = tracker_with(0, 1, 2, 3)
    assert (tracker.window, tracker.unfinished) == (4, 4)
    tracker.done(2)
    assert (tracker.window, tracker.unfinished) == (4, 3)  # finished but blocked by 0, 1
    tracker.done(0)
    assert (tracker.window, tracker.unfinished) == (3, 2)
    tracker.done(1)
    assert (tracker.window, tracker.unfinished) == (1, 1)
    tracker.done(3)
    assert (tracker.window, tracker.unfinished) == (0, 0)


def test_done_twice_before_commit_is_harmless() -> None:
    tracker = tracker_with(0, 1)
    tracker.done(1)
    tracker.done(1)
    assert (tracker.window, tracker.unfinished) == (2, 1)
    tracker.done(0)
    assert tracker.committable() == 2


@pytest.mark.parametrize("offset", [4, 3])
def test_add_rejects_going_backwards_while_pending(offset: int) -> None:
    tracker = tracker_with(3, 4)
    with pytest.raises(ValueError, match=str(offset)):
        tracker.add(offset)


def test_add_rejects_offset_before_committable() -> None:
    tracker = tracker_with(3, 4)
    tracker.done(3)
    tracker.done(4)
    assert tracker.window == 0
    with pytest.raises(ValueError, match="before the committable 5"):
        tracker.add(4)
    tracker.add(5)  # the next offset is fine
    tracker.add(8)  # and so is a gap
    assert tracker.window == 2


@st.composite
def offsets_and_completion_order(draw: st.DrawFn) -> tuple[list[int], list[int]]:
    start = draw(st.integers(min_value=0, max_value=10**12))
    gaps = draw(st.lists(st.integers(min_value=1, max_value=5), min_size=1, max_size=60))
    offsets = [start]
    for gap in gaps[1:]:
        offsets.append(offsets[-1] + gap)
    order = draw(st.permutations(offsets))
    return offsets, list(order)


@settings(max_examples=300, deadline=None)
@given(offsets_and_completion_order())
def test_never_passes_an_unfinished_offset(case: tuple[list[int], list[int]]) -> None:
    offsets, order = case
    tracker = tracker_with(*offsets)
    finished: set[int] = set()
    for offset in order:
        tracker.done(offset)
        finished.add(offset)
        position = tracker.committable()
        # The model: one past the longest finished prefix of the handed-out offsets.
        prefix = 0
        while prefix < len(offsets) and offsets[prefix] in finished:
            prefix += 1
        expected = offsets[prefix - 1] + 1 if prefix else None
        assert position == expected
        if position is not None:
            assert all(o in finished for o in offsets if o < position)
        assert tracker.unfinished == len(offsets) - len(finished)
        assert tracker.window == len(offsets) - prefix
    assert tracker.committable() == offsets[-1] + 1


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_interleaved_adds_and_completions(data: st.DataObject) -> None:
    tracker = OffsetTracker()
    next_offset = 0
    handed: list[int] = []
    finished: set[int] = set()
    for _ in range(data.draw(st.integers(min_value=1, max_value=80))):
        open_offsets = [o for o in handed if o not in finished]
        finish = bool(open_offsets) and data.draw(st.booleans())
        if finish:
            offset = data.draw(st.sampled_from(open_offsets))
            tracker.done(offset)
            finished.add(offset)
        else:
            next_offset += data.draw(st.integers(min_value=1, max_value=3))
            tracker.add(next_offset)
            handed.append(next_offset)
        position = tracker.committable()
        if position is not None:
            assert all(o in finished for o in handed if o < position)
            assert position - 1 in finished
        unfinished = [o for o in handed if o not in finished]
        assert tracker.unfinished == len(unfinished)
        if unfinished:
            assert position is None or position <= min(unfinished)
