"""Per-endpoint admission: the concurrency cap, the circuit breaker and the deliveries waiting.

Every HTTP call to an endpoint starts with `EndpointGate.enter()` and ends with `leave()`.
A delivery may wait in two ways (docs/architecture.md, retries and the circuit):

- queued: a delivery from the events, redeliver or retry topics waits for a free place while the
  circuit lets calls through. If the circuit is open, or the endpoint is failing or slow and
  too many already wait, `enter()` raises `Parked` at once: the caller parks the delivery on
  the held topic (one Kafka message) with its attempt number unchanged, so its input offset
  can be committed.
- held: a delivery read back from the held topic waits here, in memory, for as long as the
  circuit stays open: no Kafka message is produced while it waits. It is released in FIFO
  order as soon as the breaker admits calls again (the probe, then the ramp), or `enter()`
  raises `Expired` when its deadline (the end of the schedule's span) passes.

Bookkeeping is O(1) per call: counters, a deque of waiters with lazy removal (compacted
when more than half are gone), and a deque of call start times for the "slow" check.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from consumer.breaker import Breaker, BreakerPolicy, CircuitState, Verdict
from consumer.constants import HoldReason
from consumer.errors import EndpointGone, Expired, Parked
from consumer.health import EndpointHealth, HealthPolicy
from consumer.models import Endpoint


@dataclass(slots=True)
class _Call:
    started: float
    running: bool = True


@dataclass(slots=True)
class Ticket:
    """A place in an endpoint's calls; give it back with `EndpointGate.leave()`."""

    epoch: int
    call: _Call


@dataclass(slots=True)
class _Waiter:
    future: asyncio.Future[Ticket]
    held: bool
    timer: asyncio.TimerHandle | None = None
    queued: bool = True  # counted in EndpointGate._live


StateListener = Callable[["EndpointGate", CircuitState, CircuitState], None]


@dataclass(frozen=True, slots=True)
class GateLimits:
    cap: int = 50  # calls in flight per endpoint
    queue_cap: int = 100  # queued deliveries before a failing or slow endpoint's excess is parked
    slow_after_s: float = 1.0


@dataclass(eq=False)
class EndpointGate:
    endpoint: Endpoint  # as it was when the gate was made (a changed URL starts a fresh gate)
    limits: GateLimits
    breaker: Breaker
    health: EndpointHealth
    on_change: StateListener | None = None
    in_flight: int = 0
    held: int = 0
    _queue: deque[_Waiter] = field(default_factory=deque)
    _live: int = 0  # waiters in _queue whose future is not done
    _calls: deque[_Call] = field(default_factory=deque)
    _timer: asyncio.TimerHandle | None = None
    _closed: bool = False
    # The loop the gate serves, from its first `enter()` (asking asyncio each time costs a
    # getpid system call): its clock is the gate's, so timers and the breaker's times agree.
    _loop: asyncio.AbstractEventLoop | None = None

    @property
    def key(self) -> str:
        return self.endpoint.id

    @property
    def space(self) -> str:
        return self.endpoint.space

    @property
    def waiting(self) -> int:
        return self._live

    @property
    def circuit(self) -> CircuitState:
        return self.breaker.state

    def snapshot(self) -> dict[str, Any]:
        return self.health.snapshot(self._clock(), self.breaker.state, self.held)

    # Entering and leaving ---------------------------------------------------------------

    async def enter(self, held: bool = False, deadline: float | None = None) -> Ticket:
        """A place for one call. `deadline` (loop time) applies to held deliveries only."""
        if self._closed:
            raise EndpointGone(self.key)
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        now = loop.time()
        if not self._live:
            ticket = self._try_take(now)
            if ticket is not None:
                return ticket
        if not held:
            if self.breaker.blocked(now):
                raise Parked(HoldReason.CIRCUIT_OPEN)
            if self._live >= self.limits.queue_cap and (self._failing(now) or self._slow(now)):
                raise Parked(HoldReason.SATURATED)
        waiter = _Waiter(loop.create_future(), held)
        if held:
            self.held += 1
            if deadline is not None:
                waiter.timer = loop.call_at(deadline, self._expire, waiter)
        self._queue.append(waiter)
        self._live += 1
        self._pump(now)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            future = waiter.future
            if future.done() and not future.cancelled() and future.exception() is None:
                self.leave(future.result(), None)  # admitted as we were cancelled: give it back
            else:
                self._drop(waiter)
            raise
        finally:
            if held:
                self.held -= 1
            if waiter.timer is not None:
                waiter.timer.cancel()

    def leave(self, ticket: Ticket, verdict: Verdict | None, error_kind: str = "") -> None:
        """Give the place back; `verdict` None means no call was made with it."""
        self.in_flight -= 1
        ticket.call.running = False
        calls = self._calls
        while calls and not calls[0].running:
            calls.popleft()
        now = self._clock()
        if verdict is not None:
            self.health.record(now, time.time(), verdict, error_kind)
            before = self.breaker.state
            changed = self.breaker.record(now, verdict, ticket.epoch)
            if changed is not None:
                self._changed(before, changed)
        self._pump(now)

    def tick(self) -> None:
        """Apply time-based circuit changes (called about once a second)."""
        before = self.breaker.state
        changed = self.breaker.settle(self._clock())
        if changed is not None:
            self._changed(before, changed)

    def close(self) -> None:
        """The endpoint went away: every waiter gets EndpointGone; calls in flight finish."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        for waiter in self._queue:
            waiter.queued = False
            if not waiter.future.done():
                waiter.future.set_exception(EndpointGone(self.key))
        self._queue.clear()
        self._live = 0

    # Inside --------------------------------------------------------------------------------

    def _try_take(self, now: float) -> Ticket | None:
        if self.in_flight >= self.limits.cap:
            return None
        before = self.breaker.state
        if not self.breaker.admits(now, self.in_flight):
            return None
        if self.breaker.state is not before:
            self._changed(before, self.breaker.state)
        self.in_flight += 1
        call = _Call(now)
        self._calls.append(call)
        return Ticket(self.breaker.epoch, call)

    def _pump(self, now: float) -> None:
        """Hand free places to waiters in order; park queued waiters while the circuit is open."""
        if self._closed or not self._live:
            return
        if self.breaker.blocked(now):
            self._park_queued()
            self._wake_at(self.breaker.open_until)
            return
        queue = self._queue
        while queue:
            waiter = queue[0]
            if not waiter.queued or waiter.future.done():
                # Gone, or cancelled and its task not resumed yet (a shutdown cancels many at
                # once): its place goes to the next one.
                queue.popleft()
                if waiter.queued:
                    waiter.queued = False
                    self._live -= 1
                continue
            ticket = self._try_take(now)
            if ticket is None:
                break
            queue.popleft()
            waiter.queued = False
            self._live -= 1
            waiter.future.set_result(ticket)
        if self.breaker.blocked(now):  # the admission above may have found it re-opened
            self._wake_at(self.breaker.open_until)

    def _park_queued(self) -> None:
        kept: deque[_Waiter] = deque()
        for waiter in self._queue:
            if not waiter.queued:
                continue
            if waiter.held:
                kept.append(waiter)
            else:
                waiter.queued = False
                waiter.future.set_exception(Parked(HoldReason.CIRCUIT_OPEN))
        self._queue = kept
        self._live = len(kept)

    def _wake_at(self, when: float) -> None:
        if self._timer is not None and self._timer.when() <= when:
            return
        if self._timer is not None:
            self._timer.cancel()
        loop = self._loop or asyncio.get_running_loop()
        self._timer = loop.call_at(when, self._wake)

    def _wake(self) -> None:
        self._timer = None
        self._pump(self._clock())

    def _clock(self) -> float:
        return self._loop.time() if self._loop is not None else _now()

    def _expire(self, waiter: _Waiter) -> None:
        if not waiter.future.done():
            waiter.future.set_exception(Expired(self.key))
            self._drop(waiter)

    def _drop(self, waiter: _Waiter) -> None:
        """Forget a waiter that will not be served; compact the queue when mostly dead."""
        if not waiter.queued:
            return
        waiter.queued = False
        self._live -= 1
        if len(self._queue) > 64 and self._live * 2 < len(self._queue):
            self._queue = deque(w for w in self._queue if w.queued)

    def _failing(self, now: float) -> bool:
        return self.breaker.state is not CircuitState.CLOSED or self.health.streak > 0

    def _slow(self, now: float) -> bool:
        calls = self._calls
        return bool(calls) and now - calls[0].started > self.limits.slow_after_s

    def _changed(self, before: CircuitState, after: CircuitState) -> None:
        if self.on_change is not None and before is not after:
            self.on_change(self, before, after)


def _now() -> float:
    """The clock of gates and breakers: the event loop's, so timers and states agree."""
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return time.monotonic()


class Gates:
    """One gate per endpoint id, created on first use, closed when the endpoint goes away."""

    def __init__(
        self,
        breaker_policy: BreakerPolicy,
        health_policy: HealthPolicy,
        limits: GateLimits,
        on_change: StateListener | None = None,
    ) -> None:
        self._breaker_policy = breaker_policy
        self._health_policy = health_policy
        self._limits = limits
        self._on_change = on_change
        self._gates: dict[str, EndpointGate] = {}

    def get(self, endpoint: Endpoint) -> EndpointGate:
        """The endpoint's gate; a changed URL starts a fresh one (a new receiver's circuit)."""
        key = endpoint.id
        gate = self._gates.get(key)
        if gate is not None and gate.endpoint.url != endpoint.url:
            self.forget(key)
            gate = None
        if gate is None:
            gate = self._gates[key] = EndpointGate(
                endpoint,
                self._limits,
                Breaker(self._breaker_policy),
                EndpointHealth(self._health_policy),
                self._on_change,
            )
        return gate

    def find(self, key: str) -> EndpointGate | None:
        return self._gates.get(key)

    def forget(self, key: str) -> EndpointGate | None:
        """Close and drop an endpoint's gate (its waiters look the endpoint up again)."""
        gate = self._gates.pop(key, None)
        if gate is not None:
            gate.close()
        return gate

    def __iter__(self) -> Iterator[EndpointGate]:
        return iter(list(self._gates.values()))

    def __len__(self) -> int:
        return len(self._gates)
