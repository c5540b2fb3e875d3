"""Partition bookkeeping as pure decisions: pauses, resumes and what to commit."""

from __future__ import annotations

from consumer.kafka_lag import partition_lag
from consumer.partitions import PAUSE_DUE, PAUSE_WINDOW, Partitions

T0 = ("perkamo.webhooks.retry.1s", 0)
T1 = ("perkamo.events", 1)


def test_a_not_due_head_pauses_once_and_resumes_when_due() -> None:
    parts = Partitions(window=100)
    parts.assign([T0, T1])
    st = parts.get(T0)
    assert st is not None
    assert parts.hold_until_due(st, 5_000) is True  # pause now
    assert parts.hold_until_due(st, 5_000) is False  # already paused
    assert parts.next_due_ms() == 5_000
    assert not parts.changes(4_999)
    changes = parts.changes(5_000)
    assert (changes.pause, changes.resume) == ([], [T0])
    assert parts.next_due_ms() is None


def test_the_window_pauses_at_its_size_and_resumes_at_half() -> None:
    parts = Partitions(window=4)
    parts.assign([T1])
    st = parts.get(T1)
    assert st is not None
    for offset in range(4):
        st.tracker.add(offset)
    assert parts.changes(0).pause == [T1]
    assert parts.paused_counts() == {PAUSE_DUE: 0, PAUSE_WINDOW: 1}
    st.tracker.done(0)
    assert not parts.changes(0)  # 3 of 4 left: above half
    st.tracker.done(1)
    st.tracker.done(2)
    assert parts.changes(0).resume == [T1]  # 1 left: below half


def test_two_reasons_resume_only_when_both_are_gone() -> None:
    parts = Partitions(window=2)
    parts.assign([T0])
    st = parts.get(T0)
    assert st is not None
    st.tracker.add(10)
    st.tracker.add(11)
    parts.hold_until_due(st, 1_000)
    assert not parts.changes(0)  # already paused for the due time; the window adds a reason
    st.tracker.done(10)
    st.tracker.done(11)
    assert not parts.changes(500)  # the window is fine, the head is still not due
    assert parts.changes(1_000).resume == [T0]


def test_commit_positions_move_only_past_contiguous_done_offsets() -> None:
    parts = Partitions(window=100)
    parts.assign([T1])
    st = parts.get(T1)
    assert st is not None
    for offset in (5, 6, 7):
        st.tracker.add(offset)
    st.tracker.done(6)
    assert parts.committable() == []  # 5 is not done
    st.tracker.done(5)
    assert parts.committable() == [(T1, 7)]
    parts.committed(T1, 7)
    assert parts.committable() == []  # nothing new since
    st.tracker.done(7)
    assert parts.committable() == [(T1, 8)]


def test_revoked_partitions_take_no_new_pauses_and_are_dropped() -> None:
    parts = Partitions(window=1)
    parts.assign([T0, T1])
    states = parts.take([T0])
    assert states[0].revoked
    states[0].tracker.add(1)
    assert parts.changes(0).pause == []  # a revoked partition is left alone
    parts.drop(states)
    assert T0 not in parts and len(parts) == 1


def test_lag_falls_back_to_the_log_start_before_the_first_commit() -> None:
    assert partition_lag({"hi_offset": 50, "committed_offset": 20, "lo_offset": 0}) == 30
    assert partition_lag({"hi_offset": 50, "committed_offset": -1001, "lo_offset": 10}) == 40
    assert partition_lag({"hi_offset": -1}) is None
