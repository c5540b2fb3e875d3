"""8. kill -9 of the history role mid-stream, restarted: deliveries go on, and afterwards the store
holds exactly one row per attempt (none missing, none extra)."""

from __future__ import annotations

import pytest

from tests.faults.accounting import assert_accounted as check
from tests.faults.scenarios import history_kill

pytestmark = pytest.mark.integration


def test_kill_9_of_the_history_role_loses_no_row_and_redelivers_nothing(fault_env):
    result = history_kill(fault_env, n_events=400, kills=1, seed=13)
    check(result)
    assert result.duplicate_deliveries == 0
    assert result.history_missing == result.history_extra == 0
