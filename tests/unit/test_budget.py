"""The size budget's arithmetic and its sentences."""

from __future__ import annotations

from consumer.budget import FRAMING_ROOM, HEADER_ROOM, budget_of


def test_the_budget_leaves_room_for_headers_and_framing() -> None:
    budget = budget_of(1_048_576)
    assert budget.message_max_bytes == 1_048_576 + HEADER_ROOM + FRAMING_ROOM == 1_081_344
    assert budget.record_max_bytes == budget.message_max_bytes - HEADER_ROOM
    # LZ4's worst-case growth of an incompressible event fits in the framing room.
    assert FRAMING_ROOM > 1_048_576 // 255 + 16


def test_a_producer_or_topic_at_the_budget_passes_and_one_byte_short_is_named() -> None:
    budget = budget_of(1_048_576)
    assert budget.producer_problem(budget.message_max_bytes) is None
    problem = budget.producer_problem(budget.message_max_bytes - 1)
    assert problem is not None
    assert "PERKAMO_KAFKA_MESSAGE_MAX_BYTES" in problem and "PERKAMO_MAX_PAYLOAD_BYTES" in problem
    assert budget.topic_problem("perkamo.events", budget.message_max_bytes) is None
    problem = budget.topic_problem("perkamo.events", 1_048_588)  # the broker's default
    assert problem is not None
    assert "perkamo.events" in problem and "perkamo-webhooks topics" in problem
