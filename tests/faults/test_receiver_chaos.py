"""5. Receiver chaos: 5xx, 429 + Retry-After, timeouts, resets, slow and huge bodies, redirects, garbage."""

from __future__ import annotations

import pytest

from tests.faults.accounting import assert_accounted as check
from tests.faults.scenarios import receiver_chaos

pytestmark = pytest.mark.integration


def test_receiver_chaos_loses_nothing(fault_env):
    result = receiver_chaos(fault_env, n_events=150, garbage_events=20, seed=9)
    check(result)
    assert result.dead_lettered >= 20  # the garbage server never answers HTTP
    assert result.delivered > 0
