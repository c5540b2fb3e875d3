"""The accounting invariant itself, on hand-made records (no broker)."""

from __future__ import annotations

from tests.faults.accounting import (
    DeadLetter,
    Disruption,
    HistoryRow,
    InputMessage,
    Published,
    Receipt,
    evaluate,
)

T = "perkamo.events.x"


def _receipt(
    event: str, attempt: int = 1, status: int = 200, t: float = 10.0, delivery: str = "", certain: bool = True
) -> Receipt:
    return Receipt(t, "/ok", delivery or f"dlv_{event}", str(attempt), event, status, certain)


def _row(event: str, attempt: int = 1, status: str = "delivered", kind: str = "") -> HistoryRow:
    return HistoryRow(f"dlv_{event}", attempt, event, status, kind)


def _evaluate(published, receipts, dead=(), history=(), committed=None, ends=None, **kw):
    return evaluate(
        "unit",
        published,
        receipts,
        list(dead),
        list(history),
        committed if committed is not None else {(T, 0): 3},
        ends or {(T, 0): 3},
        [0],
        1.0,
        **kw,
    )


PUBLISHED = [Published("a", T, 0, 0), Published("b", T, 0, 1), Published("c", T, 0, 2)]


def test_a_clean_run_passes():
    result = _evaluate(
        PUBLISHED,
        [_receipt("a"), _receipt("b", 1, 503), _receipt("b", 2)],
        [DeadLetter("c", "schema")],
        [_row("a"), _row("b", 1, "retrying"), _row("b", 2)],
    )
    assert result.problems() == []
    assert (result.delivered, result.dead_lettered, result.lost) == (2, 1, 0)


def test_an_event_neither_delivered_nor_dead_lettered_is_lost():
    result = _evaluate(PUBLISHED, [_receipt("a"), _receipt("b")], history=[_row("a"), _row("b")])
    assert result.lost == 1 and result.samples["lost"] == ["c"]
    assert not result.ok


def test_missing_history_rows_conflicting_ids_and_unterminated_deliveries_are_problems():
    receipts = [_receipt("a"), _receipt("b", delivery="dlv_other"), _receipt("b"), _receipt("c", 1, 500)]
    result = _evaluate(PUBLISHED, receipts, history=[_row("a"), _row("b"), _row("c", 1, "retrying")])
    assert result.history_missing == 1  # dlv_other#1
    assert result.delivery_id_conflicts == 1
    assert result.history_not_terminal == 1  # c stopped at "retrying"
    assert result.lost == 1


def test_duplicates_are_allowed_only_for_attempts_made_past_the_committed_offset_before_a_kill():
    receipts = [
        _receipt("a", t=1),
        _receipt("b", t=1),
        _receipt("a", t=20),
        _receipt("b", t=20),
        _receipt("c", t=20),
    ]
    history = [_row("a"), _row("b"), _row("c")]
    inputs = [InputMessage(T, 0, i, k, 1) for i, k in enumerate("abc")]
    kill = Disruption("kill", 5.0, {(T, 0): 1})  # a committed, b not: only b may come again
    result = _evaluate(
        PUBLISHED, receipts, history=history, disruptions=[kill], inputs=inputs, max_in_flight=10
    )
    assert result.duplicate_deliveries == 2
    assert result.max_duplicates_allowed == 1
    assert result.in_flight_bound == 10
    assert not result.ok


def test_an_uncertain_2xx_counts_only_when_the_history_says_delivered():
    receipts = [_receipt("a", certain=False), _receipt("b", certain=False)]
    result = _evaluate(
        PUBLISHED[:2],
        receipts,
        history=[_row("a"), _row("b", 1, "failed")],
        committed={(T, 0): 2},
        ends={(T, 0): 2},
    )
    assert result.delivered == 1 and result.lost == 1


def test_uncommitted_offsets_and_bad_exit_codes_are_problems():
    result = evaluate(
        "unit",
        PUBLISHED,
        [_receipt(k) for k in "abc"],
        [],
        [_row(k) for k in "abc"],
        {(T, 0): 2},
        {(T, 0): 3},
        [0, 1],
        1.0,
    )
    assert result.uncommitted == {f"{T}[0]": 1}
    assert any("exit codes" in p for p in result.problems())


def test_dlq_expectations_check_the_reason():
    published = [Published("a", T, 0, 0, expect="dlq", reason="schema")]
    result = _evaluate(
        published, [], [DeadLetter("a", "invalid_json")], committed={(T, 0): 1}, ends={(T, 0): 1}
    )
    assert result.expectation_mismatches == 1


def test_an_empty_partition_never_committed_is_not_uncommitted():
    result = evaluate(
        "unit",
        PUBLISHED,
        [_receipt(k) for k in "abc"],
        [],
        [_row(k) for k in "abc"],
        {(T, 0): 3, (T, 1): -1001},
        {(T, 0): 3, (T, 1): 0},
        [0],
        1.0,
    )
    assert result.uncommitted == {}


def _at(event: str, attempt: int, status: str, at_ms: int, kind: str = "") -> HistoryRow:
    return HistoryRow(f"dlv_{event}", attempt, event, status, kind, at_ms)


def test_a_gap_in_attempt_numbers_is_a_problem():
    """What an open circuit used to do: attempt 1, then 4 (2 and 3 spent without a call)."""
    result = _evaluate(
        PUBLISHED[:1],
        [_receipt("a", 1, 503), _receipt("a", 4)],
        history=[_row("a", 1, "retrying"), _row("a", 4)],
        committed={(T, 0): 1}, ends={(T, 0): 1},
    )
    assert result.attempt_gaps == 1 and result.samples["gaps"] == ["dlv_a:[1, 4]"]
    assert not result.ok


def test_a_hold_record_is_not_an_attempt_and_the_newest_row_decides():
    published = PUBLISHED[:2]
    history = [
        _at("a", 1, "retrying", 1000, "http_status"),
        _at("a", 0, "held", 2000, "circuit_open"),  # held, then released...
        _at("a", 2, "delivered", 3000),  # ...and delivered: terminal, gapless
        _at("b", 1, "retrying", 1000, "http_status"),
        _at("b", 0, "held", 2000, "circuit_open"),  # still held at the end: not terminal
    ]
    result = _evaluate(
        published, [_receipt("a", 1, 503), _receipt("a", 2), _receipt("b", 1, 503)],
        [DeadLetter("b", "expired")], history, committed={(T, 0): 2}, ends={(T, 0): 2},
    )
    assert (result.history_missing, result.history_extra, result.attempt_gaps) == (0, 0, 0)
    assert result.history_not_terminal == 1 and result.samples["not_terminal"] == ["dlv_b"]
