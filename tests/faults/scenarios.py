"""The fault scenarios, sized by their arguments: small in CI (tests/faults/test_*.py), large in
the soak (`python -m tests.faults.soak`). Each returns the run's `Accounting`; problems that are
particular to a scenario (a bound, a timing) are added to its `extra_problems`.

Each run has deliver-role processes (`Run.consumer`) and one history-role process beside them
(`Run.history_role`, started on first need), or one `run --role all` (`Run.all_role`); see
tests/faults/harness.py."""

from __future__ import annotations

import itertools
import random
import time
from pathlib import Path
from typing import Any

from consumer import constants as c
from tests.faults.accounting import Accounting, Disruption, Receipt
from tests.faults.faulty_run import DOWN, HOLD_COMMIT, INSERTED, SLOW
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
    """1. kill -9 of the deliver role at random moments during a stream of events (the history role
    runs on beside it), restarted each time."""
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
    """2. Two deliver processes in one group; one is killed and restarted while deliveries wait in
    retry tiers."""
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


def _writes_through_an_outage(
    run: Run, stop: Any, start: Any, what: str, n_events: int, down_s: float, timeout_ms: int
) -> Accounting:
    """Deliveries in flight while `stop()` keeps Kafka from taking writes for longer than the
    producer's message timeout, then `start()`: their records and retries are tried again until
    Kafka takes them, and nothing is dead-lettered, abandoned or delivered again beyond the
    uncommitted window."""
    endpoints_file, msgs = _healthy(run, n_events, 2, (200, 400), run.name)
    proc = run.consumer(endpoints_file, max_in_flight=100, kafka_message_timeout_ms=timeout_ms, **QUICK)
    run.publisher.publish(msgs)
    run.wait_receipts(max(1, n_events // 5), 120, f"deliveries before {what} stops")
    before = run.committed()
    log(f"stopping {what} at {len(run.receipts())} requests, for {down_s}s")
    stop()
    time.sleep(down_s)
    start()
    log(f"{what} back")
    run.disruptions.append(Disruption("brokers", time.time(), before))
    result = run.finish(settle_timeout=240)
    text = proc.log_text()  # the outage outlasted the producer's timeout: writes were retried
    assert "Kafka did not take" in text and "Kafka takes writes again" in text, proc.log_tail()
    return result


def broker_outage_past_the_message_timeout(
    env: FaultEnv, n_events: int = 1500, down_s: float = 10.0, timeout_ms: int = 2000
) -> Accounting:
    """The single broker away past the producer's message timeout, mid-stream."""
    run = Run(env, "broker-outage")
    try:
        return _writes_through_an_outage(run, lambda: env.broker("stop"), lambda: env.broker("start"),
                                         "the broker", n_events, down_s, timeout_ms)
    finally:
        run.cleanup()


def two_of_three_brokers_down(
    env: FaultEnv, cluster: Any, n_events: int = 1500, down_s: float = 20.0, timeout_ms: int = 5000
) -> tuple[Accounting, int]:
    """On a three-node cluster (replication 3, min.insync.replicas 2), two nodes away past the
    producer's message timeout, mid-stream. Returns the accounting and the requests the
    receivers saw beyond one per event (duplicates)."""
    run = Run(env, "two-down", replication=3)
    try:
        result = _writes_through_an_outage(run, lambda: cluster.stop(1, 2), lambda: cluster.start(1, 2),
                                           "nodes 2 and 3", n_events, down_s, timeout_ms)
        receipts = run.receipts()
        return result, len(receipts) - len({r.event_id for r in receipts})
    finally:
        run.cleanup()


def _rate(receipts: list[Receipt], start: float, end: float) -> float:
    """Requests per second the receivers saw between two wall-clock times."""
    if end <= start:
        return 0.0
    return sum(1 for r in receipts if start <= r.t < end) / (end - start)


def history_outage(
    env: FaultEnv,
    n_events: int = 2000,
    outage_s: float = 8.0,
    batch_rows: int = 200,
    max_in_flight: int = 300,
    slow_s: float = 6.0,
    endpoints: int = 3,
    lead_s: float = 4.0,
    min_rate_ratio: float = 0.75,
) -> Accounting:
    """4. The history store fails, then is slow, while events stream in at a steady rate: the
    deliver role keeps delivering at its rate (its attempt records wait on the attempts topic),
    the history role holds one batch at most (RSS sampled), and once the store is back every row
    lands; neither role is restarted."""
    run = Run(env, "history")
    try:
        endpoints_file, msgs = _healthy(run, n_events, endpoints, (0, 20), "hist")
        history = run.history_role(
            wrapper=True, history_batch_rows=batch_rows, history_flush_interval_s=0.2
        )
        proc = run.consumer(endpoints_file, max_in_flight=max_in_flight, commit_interval_s=0.5)
        warm = min(100, n_events // 10)
        run.publisher.publish(msgs[:warm])
        run.wait_receipts(warm, 120, "the warm-up deliveries")
        wait_until(run.settled, 60, "the warm-up committed")
        wait_until(run.history_caught_up, 60, "the warm-up in history", run.check_alive, interval=0.5)
        pids = (proc.pid, history.pid)
        baseline = max(history.rss_kb() for _ in range(3))
        deliver_baseline = proc.rss_kb()
        # A steady stream through three phases: store healthy (the reference rate), down, slow.
        stream_started = time.time()
        stream = run.publisher.stream(msgs[warm:], lead_s + outage_s + slow_s)
        time.sleep(lead_s)
        (run.control / DOWN).touch()
        down_at = time.time()
        log("history store down")
        committed_at_down = sum(run.committed().values())
        samples: list[dict[str, Any]] = []
        end = time.monotonic() + outage_s
        while time.monotonic() < end:
            m = history.metrics()
            samples.append(
                {
                    "rss_kb": history.rss_kb(),
                    "deliver_rss_kb": proc.rss_kb(),
                    "buffered": m.get("perkamo_webhook_history_buffer_rows", 0),
                }
            )
            time.sleep(0.5)
        lag = sum(run.history_lag().values())
        committed_in_outage = sum(run.committed().values()) - committed_at_down
        (run.control / SLOW).touch()
        (run.control / DOWN).unlink()
        slow_at = time.time()
        log(f"history store slow ({lag} attempt records waiting on the topic)")
        time.sleep(slow_s)
        (run.control / SLOW).unlink()
        log("history store healthy")
        stream.join()
        result = run.finish(settle_timeout=180, history_timeout=180)
        receipts = run.receipts()
        before = _rate(receipts, stream_started + 1.0, down_at)
        during = _rate(receipts, down_at + 0.5, slow_at)
        in_outage = sum(1 for r in receipts if down_at <= r.t < slow_at)
        peak = max(s["rss_kb"] for s in samples)
        deliver_peak = max(s["deliver_rss_kb"] for s in samples)
        buffered = max(s["buffered"] for s in samples)
        result.notes.append(
            f"deliveries/s {before:.0f} before, {during:.0f} while the store was down "
            f"({in_outage} deliveries, {committed_in_outage} input offsets committed); {lag} records "
            f"waiting on the attempts topic at the outage's end, at most {buffered:.0f} gathered; "
            f"history RSS {baseline // 1024} -> peak {peak // 1024} MB; deliver RSS "
            f"{deliver_baseline // 1024} -> peak {deliver_peak // 1024} MB"
        )
        if before <= 0 or during < min_rate_ratio * before:
            result.extra_problems.append(
                f"deliveries slowed while the history store was down: {during:.0f}/s against "
                f"{before:.0f}/s before (< {min_rate_ratio:g}x)"
            )
        if committed_in_outage <= 0:
            result.extra_problems.append("the deliver role committed nothing while the store was down")
        if in_outage > 2 * batch_rows and lag < in_outage // 2:
            result.extra_problems.append(
                f"only {lag} attempt records waited on the topic after {in_outage} deliveries in the outage"
            )
        if buffered > batch_rows:
            result.extra_problems.append(
                f"the history role gathered {buffered:.0f} rows (> its batch of {batch_rows})"
            )
        if peak - baseline > 150 * 1024:
            result.extra_problems.append(
                f"history RSS grew by {(peak - baseline) // 1024} MB during the outage"
            )
        if deliver_peak - deliver_baseline > 150 * 1024:
            result.extra_problems.append(
                f"deliver RSS grew by {(deliver_peak - deliver_baseline) // 1024} MB during the outage"
            )
        if (proc.pid, history.pid) != pids or proc.starts != 1 or history.starts != 1:
            result.extra_problems.append("a role was restarted")
        if "history insert" not in history.log_text():
            result.extra_problems.append("no history insert failure logged: was the fault injected?")
        return result
    finally:
        run.cleanup()


def history_kill(
    env: FaultEnv,
    n_events: int = 600,
    kills: int = 2,
    seed: int | None = None,
    stream_s: float | None = None,
    endpoints: int = 2,
    down_s: float = 1.0,
    flush_s: float = 1.0,
    protocol: str = KILL_PROTOCOL,
) -> Accounting:
    """8. kill -9 of the history role mid-stream, restarted each time: deliveries go on
    meanwhile, and the store ends with one row per attempt. Even-numbered kills (the first one
    included) land right after an insert, before its commit (the restarted role inserts those
    rows again: the table's key merges them); odd ones at a random moment (a batch gathered and
    not inserted: the restarted role reads it again)."""
    rng = random.Random(seed)
    run = Run(env, "history-kill")
    try:
        endpoints_file, msgs = _healthy(run, n_events, endpoints, (0, 40), "hkill")
        # The restarted history role gets the partitions once the killed member's session expired.
        history = run.history_role(wrapper=True, history_flush_interval_s=flush_s, group_protocol=protocol)
        proc = run.consumer(endpoints_file, max_in_flight=100, commit_interval_s=0.5)
        stream = run.publisher.stream(msgs, stream_s if stream_s is not None else kills * 12 + 4)
        uncommitted: list[int] = []
        while_down = 0
        for k in range(kills):
            history.wait_healthy()
            written = history.metrics().get("perkamo_webhook_history_rows_written_total", 0)
            wait_until(
                lambda w=written: history.metrics().get("perkamo_webhook_history_rows_written_total", 0) > w,
                120,
                f"the history role writing rows before kill {k + 1}",
                run.check_alive,
                interval=0.3,
            )
            between = k % 2 == 0
            if between:
                (run.control / HOLD_COMMIT).touch()
                inserted = run.control / INSERTED
                wait_until(inserted.exists, 60, "an insert before its commit", run.check_alive)
            else:
                time.sleep(rng.uniform(0.2, flush_s + 1.0))
            lag = run.kill_history()
            for name in (HOLD_COMMIT, INSERTED):
                (run.control / name).unlink(missing_ok=True)
            uncommitted.append(sum(lag.values()))
            before = len(run.receipts())
            time.sleep(down_s)
            while_down += len(run.receipts()) - before
            log(f"history kill {k + 1}/{kills} ({'inserted, not committed' if between else 'random'}): "
                f"{uncommitted[-1]} records uncommitted, {len(run.receipts())} requests so far")
            history.start()
        stream.join()
        result = run.finish(settle_timeout=120 + n_events / 100, history_timeout=120)
        raw = run.history_rows(final=False)
        copies = len(raw) - len({(r.delivery_id, r.attempt, r.at_ms) for r in raw})
        result.notes.append(
            f"{kills} history kills with {uncommitted} attempt records uncommitted; {while_down} "
            f"deliveries while it was down; {copies} re-inserted copies not yet merged at the end "
            "(FINAL reads them once)"
        )
        if result.duplicate_deliveries:
            result.extra_problems.append(
                f"{result.duplicate_deliveries} duplicate deliveries: a history kill must not redeliver"
            )
        if not any(uncommitted):
            result.notes.append("every kill found the history role fully committed: no re-insert exercised")
        if while_down == 0 and stream.is_alive():
            result.extra_problems.append("no delivery while the history role was down")
        if proc.starts != 1:
            result.extra_problems.append("the deliver role was restarted")
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
        result.notes.append(f"answers: {dict(sorted(actions.items()))}; deliver RSS peak {peak // 1024} MB")
        followed = [r for r in receipts if r.path == "/redirect-target"]
        if followed:
            result.extra_problems.append(f"{len(followed)} redirects were followed")
        # The deliver role holds no store (≈80 MB at rest); 20 MB bodies read in full would show.
        if peak > 300 * 1024:
            result.extra_problems.append(f"deliver RSS reached {peak // 1024} MB: are huge bodies buffered?")
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
        result.notes.append(
            f"SIGTERM with {in_flight:.0f} in flight: exit {code} in {took:.1f}s "
            f"(drain timeout {drain_timeout_s:g}s); {len(acknowledged)} events committed before it"
        )
        return _judge_drain(result, run, stopped_at, acknowledged, in_flight, took, drain_timeout_s + 20)
    finally:
        run.cleanup()


def sigterm_all(
    env: FaultEnv, n_events: int = 1200, workers: int = 2, drain_timeout_s: float = 8.0, endpoints: int = 4
) -> Accounting:
    """9. SIGTERM of `run --role all` (the history process and `workers` deliver processes) under
    load: every child drains and the supervisor exits 0; after a restart nothing is lost, nothing
    committed is delivered again, and every attempt has its history row (records the deliver
    workers produced while the history child was already stopping wait on the topic)."""
    run = Run(env, "sigterm-all")
    try:
        endpoints_file, msgs = _healthy(run, n_events, endpoints, (100, 800), "termall")
        proc = run.all_role(
            endpoints_file, workers=workers, max_in_flight=200, drain_timeout_s=drain_timeout_s, **QUICK
        )
        run.publisher.publish(msgs)
        run.wait_receipts(n_events // 5, 120, "deliveries before SIGTERM")
        proc.wait_healthy()
        in_flight = sum(m.get("perkamo_webhook_in_flight", 0) for m in proc.worker_metrics())
        code, took = proc.terminate(timeout=drain_timeout_s + 60)
        stopped_at = time.time()
        run.exit_codes.append(code)
        committed = run.committed()
        acknowledged = {
            p.key for p in run.publisher.published if p.offset < committed.get((p.topic, p.partition), 0)
        }
        waiting = sum(run.history_lag().values())
        log(
            f"SIGTERM of all with {in_flight:.0f} in flight: exit {code} after {took:.1f}s; "
            f"{len(acknowledged)} events committed, {waiting} attempt records left for history"
        )
        if code != 0:
            log(proc.log_tail())
        proc.start()
        result = run.finish(settle_timeout=120, history_timeout=120)
        result.notes.append(
            f"SIGTERM of all ({workers} deliver workers) with {in_flight:.0f} in flight: exit {code} in "
            f"{took:.1f}s (drain timeout {drain_timeout_s:g}s); {len(acknowledged)} events committed "
            f"before it; {waiting} attempt records inserted after the restart"
        )
        return _judge_drain(result, run, stopped_at, acknowledged, in_flight, took, drain_timeout_s + 25)
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
        # The service's own topic: only there are perkamo-* headers read at all.
        msgs[0].headers = [("perkamo-origin-topic", b"perkamo.events"), ("perkamo-origin-offset", b"9" * 20)]
        msgs[0].topic = c.REDELIVER_TOPIC
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
        for m in (padded, control):  # on the service's own topic, where the headers are read
            m.expect, m.reason, m.topic = "dlq", "bad_header", c.REDELIVER_TOPIC
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


def _judge_drain(
    result: Accounting, run: Run, stopped_at: float, acknowledged: set[str], in_flight: float,
    took: float, allowed_s: float,
) -> Accounting:
    """After a SIGTERM and a restart: nothing committed before the stop is delivered again, the
    stop took at most `allowed_s`, and the drain had something to drain."""
    again = sorted(
        {r.event_id for r in run.receipts() if r.t > stopped_at and r.event_id in acknowledged}
    )
    if again:
        result.extra_problems.append(
            f"{len(again)} committed events were delivered again after the restart: {again[:5]}"
        )
    if took > allowed_s:
        result.extra_problems.append(f"shutdown took {took:.1f}s (allowed {allowed_s:g}s)")
    if in_flight <= 0:
        result.notes.append("nothing was in flight at SIGTERM: the drain was not exercised")
    return result
