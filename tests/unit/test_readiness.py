"""Each role's /readyz checks: not ready while Kafka does not answer, or (deliver) while a
write keeps waiting for Kafka."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from consumer.deliver_role import DeliverRole
from consumer.history_role import HistoryRole


def deliver(reachable: bool | None, writes_blocked: bool) -> DeliverRole:
    service: Any = SimpleNamespace(started=True, assigned_once=True, writes_blocked=writes_blocked)
    watch: Any = None if reachable is None else SimpleNamespace(reachable=reachable)
    registry: Any = SimpleNamespace(loaded=True)
    return DeliverRole(settings=None, metrics=None, registry=registry, service=service,  # type: ignore[arg-type]
                       watch=watch)


async def test_ready_while_kafka_answers_and_takes_every_write() -> None:
    checks = await deliver(reachable=True, writes_blocked=False).readiness()
    assert checks == {"broker": True, "assignment": True, "endpoints": True, "kafka_writes": True}


async def test_not_ready_while_kafka_does_not_answer_or_before_the_watch() -> None:
    assert (await deliver(reachable=False, writes_blocked=False).readiness())["broker"] is False
    assert (await deliver(reachable=None, writes_blocked=False).readiness())["broker"] is False


async def test_not_ready_while_a_write_waits_for_kafka() -> None:
    checks = await deliver(reachable=True, writes_blocked=True).readiness()
    assert checks["kafka_writes"] is False and checks["broker"] is True



def history(reachable: bool, healthy: bool = True, running: bool = True) -> HistoryRole:
    ingest: Any = SimpleNamespace(assigned_once=True, healthy=healthy, running=running)
    return HistoryRole(settings=None, metrics=None, store=None, registry=SimpleNamespace(loaded=True),  # type: ignore[arg-type]
                       ingest=ingest, health=None, producer=object(),  # type: ignore[arg-type]
                       watch=SimpleNamespace(reachable=reachable))  # type: ignore[arg-type]


async def test_history_is_ready_only_while_kafka_answers_and_its_writer_runs() -> None:
    assert all((await history(reachable=True).readiness()).values())
    assert (await history(reachable=False).readiness())["broker"] is False
    assert (await history(reachable=True, healthy=False).readiness())["history"] is False
    assert (await history(reachable=True, running=False).readiness())["history"] is False
