"""6. Fuzzed input: every hostile message ends in the DLQ with its reason (or is delivered if valid)."""

from __future__ import annotations

import pytest

from tests.faults.accounting import assert_accounted as check
from tests.faults.fuzz import fuzz_inputs

pytestmark = pytest.mark.integration


def test_fuzzed_input_never_crashes_and_each_message_is_accounted(fault_env):
    result = fuzz_inputs(fault_env, examples=3, max_size=25)
    check(result)
    assert result.dead_lettered > 0
