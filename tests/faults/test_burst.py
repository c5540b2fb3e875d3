"""A backlog for one healthy endpoint is delivered, not dead-lettered.

Regression test: at ef272ad, deliveries queued behind a healthy endpoint's 2x per-endpoint cap
were answered endpoint_saturated, walked the retry tiers without an HTTP call and reached the
DLQ as exhausted (607 of 1500 events here).
"""

from __future__ import annotations

import pytest

from tests.faults.accounting import assert_accounted
from tests.faults.scenarios import burst_to_one_endpoint

pytestmark = pytest.mark.integration


def test_a_backlog_for_one_healthy_endpoint_is_delivered_not_dead_lettered(fault_env):
    result = burst_to_one_endpoint(fault_env, n_events=1500)
    assert_accounted(result)
    assert result.delivered == result.events
