"""The pure rule of re-publishing (consumer.republish_plan.plan_of): which deliveries a replay
publishes and at which attempt numbers, and the double work it refuses."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from consumer import constants as c
from consumer.constants import MAX_ATTEMPT
from consumer.errors import BadRequest, Conflict
from consumer.queries import STUCK_AFTER
from consumer.republish_plan import MAX_REPLAY, DeliveryState, Selection, plan_of

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
SELECTION = Selection("s-plan", NOW - timedelta(days=1), status="failed")


def state(n: int, status: str = c.STATUS_FAILED, attempt: int = 3, replay: str = "",
          next_at: datetime | None = None) -> DeliveryState:
    return DeliveryState(f"dlv_{n}", "s-plan", attempt, status, next_at, replay, "perkamo.events", 0, n)


def nothing_pending(_: DeliveryState) -> int:
    return 0


def test_each_delivery_gets_its_next_attempt_number() -> None:
    plan = plan_of(SELECTION, [state(1, attempt=3), state(2, attempt=1)], NOW, nothing_pending)
    assert [(s.delivery_id, attempt) for s, attempt in plan.todo] == [("dlv_1", 4), ("dlv_2", 2)]
    assert plan.replay_id == SELECTION.replay_id
    assert (plan.matched, plan.in_retry, plan.on_the_way) == (2, 0, 0)


def test_deliveries_in_the_tiers_or_held_are_left_to_them_unless_stuck() -> None:
    waiting = state(1, c.STATUS_RETRYING, next_at=NOW + timedelta(seconds=30))
    held = state(2, c.STATUS_HELD)
    stuck = state(3, c.STATUS_RETRYING, next_at=NOW - STUCK_AFTER - timedelta(seconds=1))
    plan = plan_of(SELECTION, [waiting, held, stuck], NOW, nothing_pending)
    assert plan.in_retry == 2
    assert [s.delivery_id for s, _ in plan.todo] == ["dlv_3"]


def test_a_delivery_on_its_way_is_skipped_and_counted_even_when_forced() -> None:
    on_its_way = state(1)
    for force in (False, True):
        plan = plan_of(SELECTION, [on_its_way, state(2)], NOW,
                       lambda s: 4 if s.delivery_id == "dlv_1" else 0, force=force)
        assert plan.on_the_way == 1
        assert [s.delivery_id for s, _ in plan.todo] == ["dlv_2"]


def test_an_earlier_replay_is_refused_unless_forced_and_a_forced_one_gets_its_own_id() -> None:
    replayed = [state(1, replay="rpl_earlier"), state(2)]
    with pytest.raises(Conflict) as refused:
        plan_of(SELECTION, replayed, NOW, nothing_pending)
    assert refused.value.replay_id == "rpl_earlier"
    assert refused.value.fields()["already_replayed"] == 1
    forced = plan_of(SELECTION, replayed, NOW, nothing_pending, force=True)
    assert len(forced.todo) == 2 and forced.forced
    assert forced.replay_id != SELECTION.replay_id and forced.replay_id.startswith("rpl_")


def test_a_resend_is_not_an_earlier_replay() -> None:
    plan = plan_of(SELECTION, [state(1, replay="rsn_abc")], NOW, nothing_pending)
    assert len(plan.todo) == 1


def test_at_the_cap_it_plans_and_one_past_it_asks_to_split_the_range() -> None:
    at_cap = [state(n) for n in range(MAX_REPLAY)]
    assert len(plan_of(SELECTION, at_cap, NOW, nothing_pending).todo) == MAX_REPLAY
    with pytest.raises(BadRequest, match="split the time range"):
        plan_of(SELECTION, [*at_cap, state(MAX_REPLAY)], NOW, nothing_pending)


def test_a_delivery_at_the_last_attempt_number_is_not_planned() -> None:
    plan = plan_of(SELECTION, [state(1, attempt=MAX_ATTEMPT), state(2, attempt=MAX_ATTEMPT - 1)],
                   NOW, nothing_pending)
    assert [(s.delivery_id, a) for s, a in plan.todo] == [("dlv_2", MAX_ATTEMPT)]


def test_the_same_selection_gets_the_same_replay_id() -> None:
    again = Selection("s-plan", NOW - timedelta(days=1), status="failed")
    assert again.replay_id == SELECTION.replay_id
    assert Selection("s-plan", NOW - timedelta(days=2), status="failed").replay_id != SELECTION.replay_id
