"""A real three-node Kafka cluster (KRaft, each node broker and controller) on loopback, for the
outage scenarios a single broker cannot show: `deploy/kafka/kafka.sh` once per node."""

from __future__ import annotations

import base64
import os
import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from consumer.kafka_topics import wait_for_broker
from tests.support import free_port

KAFKA_SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "kafka" / "kafka.sh"


class Cluster:
    """Three nodes on free ports under `work`; `stop(i)` / `start(i)` one node, by index."""

    def __init__(self, work: Path, nodes: int = 3, heap: str = "384m") -> None:
        self.ports = [free_port() for _ in range(nodes)]
        controllers = [free_port() for _ in range(nodes)]
        voters = ",".join(f"{i + 1}@127.0.0.1:{port}" for i, port in enumerate(controllers))
        cluster_id = _kafka_uuid()
        self.envs = [
            {
                **os.environ,
                "KAFKA_PORT": str(self.ports[i]),
                "KAFKA_CONTROLLER_PORT": str(controllers[i]),
                "KAFKA_DIR": str(work / f"node{i + 1}"),
                "KAFKA_NODE_ID": str(i + 1),
                "KAFKA_VOTERS": voters,
                "KAFKA_CLUSTER_ID": cluster_id,
                "KAFKA_INTERNAL_RF": str(nodes),
                "KAFKA_HEAP": heap,
                "KAFKA_START_TIMEOUT_S": "120",
            }
            for i in range(nodes)
        ]

    @property
    def bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def start_all(self) -> None:
        """Every node at once: a node answers only once a quorum of controllers is up."""
        self.start(*range(len(self.envs)))
        wait_for_broker(self.bootstrap, 60)

    def start(self, *nodes: int) -> None:
        """Start these nodes (by index), together."""
        self._each("start", nodes)

    def stop(self, *nodes: int) -> None:
        """Stop these nodes (by index), together: each waits for its clean shutdown."""
        self._each("stop", nodes)

    def stop_all(self) -> None:
        self.stop(*range(len(self.envs)))

    def _each(self, action: str, nodes: tuple[int, ...]) -> None:
        with ThreadPoolExecutor(max(1, len(nodes))) as pool:
            list(pool.map(lambda node: self._script(action, node), nodes))

    def _script(self, action: str, node: int) -> None:
        subprocess.run([str(KAFKA_SCRIPT), action], env=self.envs[node], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _kafka_uuid() -> str:
    """A cluster id as Kafka writes them: 16 random bytes, URL-safe base64 without padding."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
