"""9. SIGTERM of `run --role all` under load: every child drains, exit 0, nothing lost."""

from __future__ import annotations

import pytest

from tests.faults.accounting import assert_accounted as check
from tests.faults.scenarios import sigterm_all

pytestmark = pytest.mark.integration


def test_sigterm_of_role_all_under_load_drains_every_child_and_loses_nothing(fault_env):
    result = sigterm_all(fault_env, n_events=800, workers=2, drain_timeout_s=8)
    check(result)
    assert result.exit_codes and all(code == 0 for code in result.exit_codes)
    assert result.duplicate_deliveries == 0
