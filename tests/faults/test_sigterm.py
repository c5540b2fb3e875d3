"""7. SIGTERM under load: drains in time, exits 0, a restart redelivers nothing that was committed."""

from __future__ import annotations

import pytest

from tests.faults.accounting import assert_accounted as check
from tests.faults.scenarios import sigterm_under_load

pytestmark = pytest.mark.integration


def test_sigterm_under_load_drains_and_redelivers_nothing_committed(fault_env):
    result = sigterm_under_load(fault_env, n_events=1200, drain_timeout_s=8)
    check(result)
    assert result.duplicate_deliveries == 0
