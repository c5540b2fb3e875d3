"""The fault scenarios, sized by their arguments: small in CI (tests/faults/test_*.py), large in
the soak (`python -m tests.faults.soak`). Each returns the run's `Accounting`; problems that are
particular to a scenario (a bound, a timing) are added to its `extra_problems`."""

from __future__ import annotations

import itertools
import random
import time
from pathlib import Path
from typing import Any

from tests.faults.accounting import Accounting, Disruption
from tests.faults.faulty_run import DOWN, SLOW
from tests.faults.harness import FaultEnv, Message, Run, events, log, wait_until
from tests.support import unique

# Faster than the service defaults so small runs settle quickly; still batched and timed.
QUICK = {"history_flush_interval_s": 0.3, "commit_interval_s": 0.5}
# A kill -9'd member keeps its partitions until its session times out: 10 s for a classic
# group (the service's session.timeout.ms), 45 s for a KIP-848 group (the broker's
# group.consumer.session.timeout.ms). Kill scenarios use classic groups to stay short.
KILL_PROTOCOL = "classic"


def _space(prefix: str) -> str:
    return unique(prefix).lower()


def _healthy(
    run: Run, n_events: int, endpoints: int, delay_ms: tuple[int, int], prefix: str
) -> tuple[Path, list[Message]]:
    """`endpoints` Spaces whose endpoints always answer 2xx (after a delay), and `n_events`
    events spread over them, each expected to be delivered (never dead-lettered)."""
    rec = run.receiver({f"/ok{i}": {"mode": "ok", "delay_ms": list(delay_ms)} for i in range(endpoints)})
    spaces = [_space(f"{prefix}{i}") for i in range(endpoints)]
    per_space = [
        events(space, n_events // endpoints + (i < n_events % endpoints), "deliver")
        for i, space in enumerate(spaces)
    ]
    msgs = [m for group in itertools.zip_longest(*per_space) for m in group if m is not None]
    return run.endpoints_file({space: rec.url(f"/ok{i}") for i, space in enumerate(spaces)}), msgs


def kill_restart(
    env: FaultEnv,
    n_events: int = 600,
    kills: int = 2,
    seed: int | None = None,
    max_in_flight: int = 100,
    stream_s: float | None = None,
    protocol: str = KILL_PROTOCOL,
    endpoints: int = 1,
) -> Accounting:
    """1. kill -9 at random moments during a stream of events, restart each time."""
    rng = random.Random(seed)
    run = Run(env, "kill-9")
    try:
        endpoints_file, msgs = _healthy(run, n_events, endpoints, (0, 60), "kill")
        proc = run.consumer(endpoints_file, group_protocol=protocol, max_in_flight=max_in_flight, **QUICK)
        stream = run.publisher.stream(msgs, stream_s if stream_s is not None else kills * 6 + 4)
        for k in range(kills):
            run.wait_receipts(len(run.receipts()) + 1, 120, f"deliveries before kill {k + 1}")
            time.sleep(rng.uniform(0.3, 3.0))
            run.kill(proc)
            log(f"kill {k + 1}/{kills}: {len(run.receipts())} requests so far")
            proc.start()
        stream.join()
        return run.finish(settle_timeout=120 + n_events / 100)
    finally:
        run.cleanup()


def rebalance_mid_retry(
    env: FaultEnv,
    n_events: int = 300,
    kills: int = 2,
    seed: int | None = None,
    fail_pct: int = 35,
    stream_s: float | None = None,
    protocol: str = KILL_PROTOCOL,
) -> Accounting:
    """2. Two consumers in one group; one is killed and restarted while deliveries wait in retry tiers."""
    rng = random.Random(seed)
    run = Run(env, "rebalance")
    try:
        rec = run.receiver(
            {"/flaky": {"mode": "flaky", "fail_pct": fail_pct, "seed": rng.randrange(1 << 30)}}
        )
        space = _space("rebal")
        endpoints = run.endpoints_file({space: rec.url("/flaky")})
        victim = run.consumer(endpoints, group_protocol=protocol, max_in_flight=50, **QUICK)
        run.consumer(endpoints, group_protocol=protocol, max_in_flight=50, **QUICK)
        stream = run.publisher.stream(
            events(space, n_events), stream_s if stream_s is not None else kills * 8 + 4
        )
        for k in range(kills):
            # Kill a member that holds partitions (after a kill it has none until the dead
            # member's session expires), while deliveries wait in the retry tiers.
            wait_until(
                lambda: victim.metrics().get("perkamo_webhook_assigned_partitions", 0) > 0,
                120,
                f"the victim's assignment before kill {k + 1}",
                run.check_alive,
                interval=0.5,
            )
            time.sleep(rng.uniform(0.5, 4.0))
            run.kill(victim)
            log(f"rebalance kill {k + 1}/{kills}: {len(run.receipts())} requests so far")
            victim.start()
        stream.join()
        return run.finish(settle_timeout=150 + n_events / 100)
    finally:
        run.cleanup()


def broker_restart(
    env: FaultEnv, n_events: int = 400, down_s: float = 3.0, seed: int | None = None, stream_s: float = 12.0
) -> Accounting:
    """3. The broker is stopped and restarted (same port, same data) mid-stream."""
    rng = random.Random(seed)
    run = Run(env, "broker-restart")
    try:
        endpoints_file, msgs = _healthy(run, n_events, 2, (0, 30), "broker")
        run.consumer(endpoints_file, max_in_flight=100, **QUICK)
        stream = run.publisher.stream(msgs, stream_s)
        run.wait_receipts(max(1, n_events // 5), 120, "deliveries before the broker stops")
        time.sleep(rng.uniform(0.0, 1.0))
        before = run.committed()
        log(f"stopping the broker at {len(run.receipts())} requests")
        env.broker("stop")
        time.sleep(down_s)
        env.broker("start")
        log("broker back")

        def advanced() -> bool:
            try:
                now = run.committed()
            except Exception:  # the broker is still loading
                return False
            return any(now.get(tp, -1) > off for tp, off in before.items()) or run.settled()

        wait_until(advanced, 180, "the first commit after the broker restart", interval=0.5)
        # Anything attempted until now and not committed before the stop may come again.
        run.disruptions.append(Disruption("broker", time.time(), before))
        stream.join()
        return run.finish(settle_timeout=180)
    finally:
        run.cleanup()


def history_outage(
    env: FaultEnv,
    n_events: int = 2000,
    outage_s: float = 8.0,
    max_buffered: int = 200,
    max_in_flight: int = 300,
    slow_s: float = 6.0,
    endpoints: int = 3,
) -> Accounting:
    """4. The history store fails, then is slow: intake pauses, memory stays bounded, nothing is
    lost, and the consumer recovers without a restart."""
    run = Run(env, "history")
    try:
        endpoints_file, msgs = _healthy(run, n_events, endpoints, (0, 20), "hist")
        proc = run.consumer(
            endpoints_file,
            wrapper=True,
            history_max_buffered_rows=max_buffered,
            max_in_flight=max_in_flight,
            history_flush_interval_s=0.2,
            commit_interval_s=0.5,
        )
        warm = min(100, n_events // 10)
        run.publisher.publish(msgs[:warm])
        run.wait_receipts(warm, 120, "the warm-up deliveries")
        wait_until(run.settled, 60, "the warm-up committed")
        pid = proc.pid
        baseline = max(proc.rss_kb() for _ in range(3))

        (run.control / DOWN).touch()
        log("history store down")
        before = len(run.receipts())
        run.publisher.publish(msgs[warm:])
        samples: list[dict[str, Any]] = []
        end = time.monotonic() + outage_s
        while time.monotonic() < end:
            m = proc.metrics()
            samples.append(
                {
                    "rss_kb": proc.rss_kb(),
                    "receipts": len(run.receipts()) - before,
                    "backlog": m.get("perkamo_webhook_history_buffer_rows", 0),
                    "paused": m.get('perkamo_webhook_paused_partitions{reason="history"}', 0),
                }
            )
            time.sleep(0.5)
        during = len(run.receipts()) - before

        (run.control / SLOW).touch()
        (run.control / DOWN).unlink()
        log(f"history store slow (outage took {during} deliveries)")
        slow_mark = len(run.receipts())
        time.sleep(slow_s)
        (run.control / SLOW).unlink()
        log("history store healthy")
        result = run.finish(settle_timeout=180)

        peak = max(s["rss_kb"] for s in samples)
        bound = max_buffered + max_in_flight
        result.notes.append(
            f"outage: {during} deliveries of {n_events - warm} queued; backlog max "
            f"{max(s['backlog'] for s in samples):.0f}; RSS {baseline // 1024} MB -> peak {peak // 1024} MB; "
            f"{len(run.receipts()) - slow_mark} deliveries after the outage"
        )
        if during > bound:
            result.extra_problems.append(
                f"intake not paused: {during} deliveries while history was down "
                f"(> {bound} = max buffered rows + max in flight)"
            )
        if not any(s["paused"] for s in samples):
            result.extra_problems.append("no partition was ever paused for history")
        if max(s["backlog"] for s in samples) > bound:
            result.extra_problems.append("history backlog exceeded max buffered rows + max in flight")
        if peak - baseline > 200 * 1024:
            result.extra_problems.append(f"RSS grew by {(peak - baseline) // 1024} MB during the outage")
        if proc.pid != pid or proc.starts != 1:
            result.extra_problems.append("the consumer was restarted")
        if "history write" not in (run.folder / "consumer0-1.log").read_text(errors="replace"):
            result.extra_problems.append("no history write failure logged: was the fault injected?")
        return result
    finally:
        run.cleanup()


def receiver_chaos(
    env: FaultEnv, n_events: int = 160, garbage_events: int = 20, seed: int | None = None
) -> Accounting:
    """5. Receivers misbehave in every way a real one can; none of it loses an event."""
    rng = random.Random(seed)
    run = Run(env, "chaos")
    try:
        rec = run.receiver(
            {
                "/chaos": {"mode": "chaos", "seed": rng.randrange(1 << 30)},
                "/redirect-target": {"mode": "target"},
            },
            garbage=True,
        )
        chaos, garbage = _space("chaos"), _space("garbage")
        proc = run.consumer(
            run.endpoints_file({chaos: rec.url("/chaos"), garbage: rec.garbage_url()}),
            delivery_timeout_s=1,
            breaker_min_calls=25,
            breaker_cooldown_s=2,
            max_in_flight=100,
            **QUICK,
        )
        run.publisher.publish(events(chaos, n_events) + events(garbage, garbage_events))
        peak = 0

        def sample_rss() -> bool:
            nonlocal peak
            peak = max(peak, proc.rss_kb())
            return run.settled()

        wait_until(sample_rss, 180, "the chaos to settle", run.check_alive, interval=1.0)
        result = run.finish(settle_timeout=30)
        receipts = [r for r in rec.receipts() if r.event_id]
        actions: dict[str, int] = {}
        for r in receipts:
            actions[r.action] = actions.get(r.action, 0) + 1
        result.notes.append(f"answers: {dict(sorted(actions.items()))}; consumer RSS peak {peak // 1024} MB")
        followed = [r for r in receipts if r.path == "/redirect-target"]
        if followed:
            result.extra_problems.append(f"{len(followed)} redirects were followed")
        if peak > 600 * 1024:
            result.extra_problems.append(f"consumer RSS reached {peak // 1024} MB: are huge bodies buffered?")
        return result
    finally:
        run.cleanup()


def sigterm_under_load(
    env: FaultEnv, n_events: int = 1200, drain_timeout_s: float = 8.0, endpoints: int = 4
) -> Accounting:
    """7. SIGTERM under load drains in time and exits 0; a restart redelivers nothing committed."""
    run = Run(env, "sigterm")
    try:
        endpoints_file, msgs = _healthy(run, n_events, endpoints, (100, 800), "term")
        proc = run.consumer(endpoints_file, max_in_flight=200, drain_timeout_s=drain_timeout_s, **QUICK)
        run.publisher.publish(msgs)
        run.wait_receipts(n_events // 5, 120, "deliveries before SIGTERM")
        in_flight = proc.metrics().get("perkamo_webhook_in_flight", -1)
        code, took = proc.terminate(timeout=drain_timeout_s + 60)
        stopped_at = time.time()
        run.exit_codes.append(code)
        committed = run.committed()
        acknowledged = {
            p.key for p in run.publisher.published if p.offset < committed.get((p.topic, p.partition), 0)
        }
        log(
            f"SIGTERM with {in_flight:.0f} in flight: exit {code} after {took:.1f}s; "
            f"{len(acknowledged)} events committed"
        )
        proc.start()
        result = run.finish(settle_timeout=120)
        again = sorted(
            {r.event_id for r in run.receipts() if r.t > stopped_at and r.event_id in acknowledged}
        )
        result.notes.append(
            f"SIGTERM with {in_flight:.0f} in flight: exit {code} in {took:.1f}s "
            f"(drain timeout {drain_timeout_s:g}s); {len(acknowledged)} events committed before it"
        )
        if again:
            result.extra_problems.append(
                f"{len(again)} committed events were delivered again after the restart: {again[:5]}"
            )
        if took > drain_timeout_s + 20:
            result.extra_problems.append(f"shutdown took {took:.1f}s (drain timeout {drain_timeout_s:g}s)")
        if in_flight <= 0:
            result.notes.append("nothing was in flight at SIGTERM: the drain was not exercised")
        return result
    finally:
        run.cleanup()


def poison_origin_header(env: FaultEnv, n_events: int = 20, settle_s: float = 15.0) -> Accounting:
    """A valid event whose perkamo-origin-offset header is past Int64: its history row can never be
    inserted. The writer must not let that one row hold every other row (and so every commit) back."""
    run = Run(env, "poison")
    try:
        rec = run.receiver({"/ok": {"mode": "ok"}})
        space = _space("poison")
        run.consumer(run.endpoints_file({space: rec.url("/ok")}), drain_timeout_s=3, **QUICK)
        msgs = events(space, n_events)
        msgs[0].headers = [("perkamo-origin-topic", b"perkamo.events"), ("perkamo-origin-offset", b"9" * 20)]
        run.publisher.publish(msgs)
        return run.finish(settle_timeout=settle_s)
    finally:
        run.cleanup()


def malformed_delivery_id(env: FaultEnv, settle_s: float = 20.0) -> Accounting:
    """Events whose perkamo-delivery-id header HTTP cannot carry verbatim (padding, a control
    character) must be refused as bad headers, not sent under an id history does not hold."""
    run = Run(env, "delivery-id")
    try:
        rec = run.receiver({"/ok": {"mode": "ok"}})
        space = _space("dlvid")
        run.consumer(run.endpoints_file({space: rec.url("/ok")}), drain_timeout_s=3, **QUICK)
        padded, control, plain = events(space, 3)
        padded.headers = [("perkamo-delivery-id", b" dlv_padded ")]
        control.headers = [("perkamo-delivery-id", b"dlv_\x1cctl")]
        for m in (padded, control):
            m.expect, m.reason = "dlq", "bad_header"
        plain.expect = "deliver"
        run.publisher.publish([padded, control, plain])
        return run.finish(settle_timeout=settle_s)
    finally:
        run.cleanup()


def burst_to_one_endpoint(
    env: FaultEnv, n_events: int = 1500, settle_s: float = 60.0, delay_ms: tuple[int, int] = (100, 200)
) -> Accounting:
    """A backlog for one healthy endpoint is delivered. Deliveries waiting for the endpoint's
    connections were never attempted: they must not use up attempts and reach the DLQ."""
    run = Run(env, "burst")
    try:
        endpoints_file, msgs = _healthy(run, n_events, 1, delay_ms, "burst")
        run.publisher.publish(msgs)  # a backlog, as after an outage or a deploy
        run.consumer(endpoints_file, **QUICK)  # default max in flight (1000) and per endpoint (50)
        return run.finish(settle_timeout=settle_s)
    finally:
        run.cleanup()
