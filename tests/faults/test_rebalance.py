"""2. Two deliver processes in a group; one killed and restarted while deliveries wait in retry tiers."""

from __future__ import annotations

import pytest

from tests.faults.accounting import assert_accounted as check
from tests.faults.scenarios import rebalance_mid_retry

pytestmark = pytest.mark.integration


def test_rebalances_mid_retry_lose_nothing(fault_env):
    result = rebalance_mid_retry(fault_env, n_events=240, kills=2, seed=5, fail_pct=35)
    check(result)
    assert result.attempts_seen > result.events  # retries happened
