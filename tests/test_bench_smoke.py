"""`python -m tests.bench --smoke` runs end to end against the roles (deliver and history as
subprocesses) and writes its JSON. Figures are not checked (CI machines are too noisy for that;
`make bench` on a quiet machine is where they count), except the accounting ones: an attempt
record per delivery, and no row lost while the history role was stopped."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

REPO = Path(__file__).resolve().parent.parent

TOP_KEYS = {"meta", "phases", "table"}
META_KEYS = {"started", "finished", "mode", "phases", "sizes", "machine", "completed"}
PHASE_KEYS = {
    "raw": {"events", "concurrency", "deliveries", "errors", "deliveries_per_s", "client_cpu_s",
            "cpu_us_per_request", "receiver"},
    "e2e": {"metrics_on", "deliveries_per_s", "ratio_to_raw", "cpu_us_per_delivery", "raw_cpu_us_per_request",
            "history_caught_up_s", "history_exit_ok"},
    "latency": {"rate_per_s", "produced", "received", "min_ms", "p50_ms", "p95_ms", "p99_ms", "max_ms",
                "produce_ack", "receiver"},
    "retry": {"events", "history_rows", "complete_deliveries", "lateness", "lateness_from_start",
              "never_early", "history_catch_up", "receiver"},
    "outage": {"rate_per_s", "outage_s", "variants", "stopped"},
}
THROUGHPUT_KEYS = {"deliveries", "deliveries_per_s", "wall_to_committed_s", "all_committed",
                   "cpu_us_per_delivery", "cpu_s_per_1k", "cpu_s_per_1k_steady", "threads", "per_process",
                   "exit_ok", "receiver", "history_role"}
CATCH_UP_KEYS = {"attempt_records", "caught_up_s", "rows_written", "timed_out"}
OUTAGE_KEYS = {"deliveries_per_s_before", "deliveries_per_s_during", "deliveries_per_s_after",
               "ratio_during_before", "records_waiting_when_back", "history_rows_final",
               "attempts_seen_by_receiver", "rows_lost", "history_catch_up", "all_committed", "exit_ok"}
LATENESS_KEYS = {"samples", "min_ms", "p50_ms", "p99_ms", "max_ms"}


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_bench_smoke_runs_and_writes_json(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.bench", "--smoke", "--out-dir", str(tmp_path)],
        check=False, cwd=REPO, capture_output=True, timeout=280,
    )
    output = (proc.stdout + proc.stderr).decode(errors="replace")
    assert proc.returncode == 0, output[-6000:]
    files = list(tmp_path.glob("bench-*.json"))
    assert len(files) == 1, output[-2000:]
    doc = orjson.loads(files[0].read_bytes())

    assert doc.keys() >= TOP_KEYS
    assert doc["meta"].keys() >= META_KEYS
    assert doc["meta"]["mode"] == "smoke"
    assert doc["meta"]["completed"] is True
    assert set(doc["phases"]) == set(PHASE_KEYS)
    for phase, keys in PHASE_KEYS.items():
        assert "error" not in doc["phases"][phase], doc["phases"][phase].get("error")
        missing = keys - doc["phases"][phase].keys()
        assert not missing, f"{phase} lacks {missing}"
    on = doc["phases"]["e2e"]["metrics_on"]
    missing = THROUGHPUT_KEYS - on.keys()
    assert not missing, f"e2e.metrics_on lacks {missing}"
    assert on["deliveries"] >= on["events"]
    assert on["threads"] and {"thread", "cpu_s", "share_of_process"} <= on["threads"][0].keys()
    catch = on["history_role"]["catch_up"]
    assert catch.keys() >= CATCH_UP_KEYS
    assert catch["attempt_records"] >= on["events"]  # one attempt record per delivery, on the topic
    stopped = doc["phases"]["outage"]["stopped"]
    missing = OUTAGE_KEYS - stopped.keys()
    assert not missing, f"outage.stopped lacks {missing}"
    assert stopped["rows_lost"] == 0, stopped
    assert stopped["attempts_seen_by_receiver"] > 0
    assert doc["phases"]["retry"]["lateness"].keys() >= LATENESS_KEYS
    assert doc["phases"]["latency"]["received"] == doc["phases"]["latency"]["produced"]
    assert doc["phases"]["retry"]["complete_deliveries"] == doc["phases"]["retry"]["events"]
    assert doc["table"] and {"phase", "figure", "value", "target", "met"} <= doc["table"][0].keys()
