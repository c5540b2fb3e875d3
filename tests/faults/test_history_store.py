"""4. The history store fails, then is slow: intake pauses, memory stays bounded, nothing is lost."""

from __future__ import annotations

import pytest

from tests.faults.accounting import assert_accounted as check
from tests.faults.scenarios import history_outage

pytestmark = pytest.mark.integration


def test_history_outage_pauses_intake_and_recovers_without_restart(fault_env):
    check(history_outage(fault_env, n_events=1500, outage_s=6, max_buffered=200, max_in_flight=300, slow_s=5))
