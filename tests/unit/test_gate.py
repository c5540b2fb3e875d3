"""The per-endpoint gate on a real event loop: caps, parking, holding, the ramp, expiry."""

from __future__ import annotations

import asyncio

import pytest

from consumer.breaker import BreakerPolicy, CircuitState, Verdict
from consumer.errors import EndpointGone, Expired, Parked
from consumer.gate import GateLimits, Gates
from consumer.health import HealthPolicy
from consumer.models import Endpoint

EP = Endpoint("ep", "s", "https://receiver.example/hook")

FAST = BreakerPolicy(window_s=30, min_calls=4, failure_rate=0.5, cooldown_s=0.2, cooldown_max_s=1.0,
                     ramp_to=8, ramp_s=5)


def gates(cap: int = 8, queue_cap: int = 16, policy: BreakerPolicy = FAST, changes=None) -> Gates:
    def listen(gate, before, after):
        if changes is not None:
            changes.append((before, after))

    return Gates(policy, HealthPolicy(), GateLimits(cap=cap, queue_cap=queue_cap, slow_after_s=60),
                 on_change=listen)


async def trip(gate, calls: int = 4) -> None:
    tickets = [await gate.enter() for _ in range(calls)]
    for ticket in tickets:
        gate.leave(ticket, Verdict.FAILURE, "http_status")
    assert gate.circuit is CircuitState.OPEN


async def test_the_cap_queues_calls_in_order():
    gate = gates(cap=2).get(EP)
    first, second = await gate.enter(), await gate.enter()
    order = []

    async def third():
        ticket = await gate.enter()
        order.append("third")
        return ticket

    task = asyncio.create_task(third())
    await asyncio.sleep(0.01)
    assert gate.waiting == 1 and not order
    gate.leave(first, Verdict.SUCCESS)
    gate.leave((await task), Verdict.SUCCESS)
    gate.leave(second, Verdict.SUCCESS)
    assert order == ["third"] and gate.in_flight == 0


async def test_an_open_circuit_parks_fresh_deliveries_at_once():
    gate = gates().get(EP)
    await trip(gate)
    with pytest.raises(Parked) as parked:
        await gate.enter()
    assert parked.value.reason == "circuit_open"


async def test_queued_deliveries_are_parked_when_the_circuit_opens():
    gate = gates(cap=2).get(EP)
    for _ in range(3):  # three failures: one short of the minimum
        gate.leave(await gate.enter(), Verdict.FAILURE)
    running = [await gate.enter() for _ in range(2)]
    waiting = asyncio.create_task(gate.enter())
    await asyncio.sleep(0.01)
    gate.leave(running[0], Verdict.FAILURE)  # the fourth: it opens before the place is handed on
    with pytest.raises(Parked):
        await waiting
    gate.leave(running[1], None)


async def test_held_deliveries_wait_for_the_probe_then_ramp_out():
    changes = []
    gate = gates(cap=8, changes=changes).get(EP)
    await trip(gate)
    admitted: list[float] = []
    loop = asyncio.get_running_loop()

    async def held(n: int):
        ticket = await gate.enter(held=True, deadline=loop.time() + 30)
        admitted.append(loop.time())
        await asyncio.sleep(0.01)  # a round trip
        gate.leave(ticket, Verdict.SUCCESS)

    opened = loop.time()
    tasks = [asyncio.create_task(held(n)) for n in range(20)]
    await asyncio.sleep(0.05)
    assert gate.held == 20 and not admitted  # nothing goes out while it is open
    await asyncio.gather(*tasks)
    assert len(admitted) == 20
    assert min(admitted) - opened >= 0.19  # the first is the probe, after the cool-down
    assert max(admitted) - min(admitted) < 0.5  # then the ramp: 1, 2, 4, 8 ... per round trip
    assert (CircuitState.OPEN, CircuitState.HALF_OPEN) in changes
    assert changes[-1] == (CircuitState.HALF_OPEN, CircuitState.CLOSED)


async def test_the_ramp_admits_a_growing_share():
    gate = gates(cap=8).get(EP)
    await trip(gate)
    loop = asyncio.get_running_loop()
    in_flight_seen: list[int] = []

    async def held():
        ticket = await gate.enter(held=True, deadline=loop.time() + 30)
        in_flight_seen.append(gate.in_flight)
        await asyncio.sleep(0.02)
        gate.leave(ticket, Verdict.SUCCESS)

    await asyncio.gather(*(held() for _ in range(15)))
    assert in_flight_seen[0] == 1  # the probe alone
    assert max(in_flight_seen) > 2  # then more at once, never all 15 in the first round
    assert in_flight_seen.count(1) < 15


async def test_a_held_delivery_expires_at_its_deadline():
    gate = gates().get(EP)
    await trip(gate)
    gate.breaker.open_until += 60  # stays open
    loop = asyncio.get_running_loop()
    with pytest.raises(Expired):
        await gate.enter(held=True, deadline=loop.time() + 0.05)
    assert gate.held == 0 and gate.waiting == 0


async def test_a_failed_probe_keeps_the_others_held():
    gate = gates().get(EP)
    await trip(gate)
    loop = asyncio.get_running_loop()
    probe = await gate.enter(held=True, deadline=loop.time() + 30)
    other = asyncio.create_task(gate.enter(held=True, deadline=loop.time() + 30))
    await asyncio.sleep(0.01)
    gate.leave(probe, Verdict.FAILURE)
    assert gate.circuit is CircuitState.OPEN
    assert gate.breaker.cooldown_s == pytest.approx(0.4)  # doubled
    await asyncio.sleep(0.1)
    assert not other.done() and gate.held == 1
    ticket = await other  # the next probe
    gate.leave(ticket, Verdict.SUCCESS)


async def test_cancelled_waiters_leave_no_trace():
    gate = gates(cap=1).get(EP)
    ticket = await gate.enter()
    waiters = [asyncio.create_task(gate.enter()) for _ in range(100)]
    await asyncio.sleep(0.01)
    for task in waiters:
        task.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    assert gate.waiting == 0
    gate.leave(ticket, Verdict.SUCCESS)
    assert gate.in_flight == 0
    again = await gate.enter()
    assert gate.in_flight == 1
    gate.leave(again, None)


async def test_forgetting_an_endpoint_releases_its_waiters():
    registry = gates(cap=1)
    gate = registry.get(EP)
    ticket = await gate.enter()
    held = asyncio.create_task(gate.enter(held=True))
    await asyncio.sleep(0.01)
    registry.forget("ep")
    with pytest.raises(EndpointGone):
        await held
    gate.leave(ticket, Verdict.SUCCESS)
    assert registry.find("ep") is None


async def test_a_changed_url_starts_a_fresh_gate():
    registry = gates()
    gate = registry.get(Endpoint("ep", "s", "https://old.example/h"))
    await trip(gate)
    fresh = registry.get(Endpoint("ep", "s", "https://new.example/h"))
    assert fresh is not gate and fresh.circuit is CircuitState.CLOSED


async def test_a_saturated_failing_endpoint_parks_the_excess():
    gate = gates(cap=1, queue_cap=2).get(EP)
    first = await gate.enter()
    gate.leave(first, Verdict.FAILURE)  # failing: its last call failed
    running = await gate.enter()
    queued = [asyncio.create_task(gate.enter()) for _ in range(2)]
    await asyncio.sleep(0.01)
    with pytest.raises(Parked) as parked:
        await gate.enter()
    assert parked.value.reason == "endpoint_saturated"
    gate.leave(running, Verdict.SUCCESS)
    for task in queued:
        gate.leave(await task, Verdict.SUCCESS)


async def test_a_place_freed_while_a_cancelled_waiter_has_not_resumed_goes_to_the_next():
    """A drain deadline cancels many tasks at once: a call giving its place back must skip a
    waiter whose future is cancelled but whose task has not run its handler yet (found by the
    benchmark: InvalidStateError, and the cancelled delivery dead-lettered)."""
    gate = gates(cap=1).get(EP)
    running = await gate.enter()
    first = asyncio.create_task(gate.enter())
    second = asyncio.create_task(gate.enter())
    await asyncio.sleep(0.01)
    first.cancel()  # its future is cancelled now, its except-block runs later
    gate.leave(running, None)  # must not set_result on the cancelled future
    ticket = await second
    assert gate.in_flight == 1
    with pytest.raises(asyncio.CancelledError):
        await first
    gate.leave(ticket, None)
    assert gate.in_flight == 0 and gate.waiting == 0
