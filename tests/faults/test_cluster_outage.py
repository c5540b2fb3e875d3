"""Two of three Kafka nodes away past the producer's timeout: nothing dead-lettered as failed,
nothing abandoned, no duplicates beyond the uncommitted window (a cluster of its own)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trustme

from tests.faults.accounting import assert_accounted
from tests.faults.cluster import Cluster
from tests.faults.harness import FaultEnv, log
from tests.faults.scenarios import two_of_three_brokers_down

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    nodes = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        nodes.start_all()
        yield nodes
    finally:
        nodes.stop_all()


def test_two_of_three_nodes_down_past_the_producer_timeout(
    cluster: Cluster, ca: trustme.CA, ca_file, tmp_path_factory: pytest.TempPathFactory
) -> None:
    env = FaultEnv.create(cluster.bootstrap, ca, ca_file, tmp_path_factory.mktemp("two-down"))
    result, duplicates = two_of_three_brokers_down(env, cluster)
    log(f"two of three nodes down: {duplicates} requests beyond one per event")
    assert_accounted(result)
