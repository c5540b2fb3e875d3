"""Kafka headers the service takes from input messages must not break history or delivery ids.

Regression tests: both once broke the service (an out-of-range origin offset wedged the
history writer; any delivery id header was used verbatim). consumer/headers.py now reads every
perkamo-* header strictly and dead-letters bad ones as bad_header.
"""

from __future__ import annotations

import pytest

from tests.faults.accounting import assert_accounted
from tests.faults.scenarios import malformed_delivery_id, poison_origin_header

pytestmark = pytest.mark.integration


def test_an_out_of_range_origin_header_does_not_wedge_the_history_writer(fault_env):
    assert_accounted(poison_origin_header(fault_env))


def test_a_malformed_delivery_id_header_is_dead_lettered_as_a_bad_header(fault_env):
    assert_accounted(malformed_delivery_id(fault_env))
