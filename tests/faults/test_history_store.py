"""4. The history store fails, then is slow: deliveries go on at their rate, the history role's
memory stays bounded, and every row lands once the store is back."""

from __future__ import annotations

import pytest

from tests.faults.accounting import assert_accounted as check
from tests.faults.scenarios import history_outage

pytestmark = pytest.mark.integration


def test_a_history_store_outage_does_not_pause_deliveries_and_loses_no_row(fault_env):
    check(history_outage(fault_env, n_events=1200, outage_s=6, batch_rows=200, max_in_flight=300, slow_s=4))
