"""1. kill -9 of the deliver role at random moments during a stream: nothing lost, duplicates within
the uncommitted window."""

from __future__ import annotations

import pytest

from tests.faults.accounting import assert_accounted as check
from tests.faults.scenarios import kill_restart

pytestmark = pytest.mark.integration


def test_kill_9_repeatedly_during_a_stream_loses_nothing(fault_env):
    result = kill_restart(fault_env, n_events=500, kills=2, seed=11, max_in_flight=100)
    check(result)
    assert result.in_flight_bound is not None
    assert result.max_duplicates_allowed <= result.events
