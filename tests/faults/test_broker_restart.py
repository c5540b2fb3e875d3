"""3. The broker stops and comes back mid-stream."""

from __future__ import annotations

import pytest

from tests.faults.accounting import assert_accounted as check
from tests.faults.scenarios import broker_outage_past_the_message_timeout, broker_restart

pytestmark = pytest.mark.integration


def test_broker_restart_mid_stream_loses_nothing(fault_env):
    if not fault_env.kafka_env:
        pytest.skip("the broker is external (KAFKA_BOOTSTRAP_SERVERS): it cannot be restarted here")
    check(broker_restart(fault_env, n_events=400, down_s=3, seed=3))


def test_an_outage_past_the_producer_timeout_dead_letters_nothing_and_abandons_nothing(fault_env):
    if not fault_env.kafka_env:
        pytest.skip("the broker is external (KAFKA_BOOTSTRAP_SERVERS): it cannot be restarted here")
    check(broker_outage_past_the_message_timeout(fault_env))
