"""`python -m tests.bench --smoke` runs end to end and writes its JSON (figures are not checked:
CI machines are too noisy for that; `make bench` on a quiet machine is where they count)."""

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
    "raw": {"events", "concurrency", "deliveries", "errors", "deliveries_per_s", "client_cpu_s", "receiver"},
    "e2e": {"metrics_on", "metrics_off", "deliveries_per_s", "ratio_to_raw", "metrics_off_over_on"},
    "latency": {"rate_per_s", "produced", "received", "min_ms", "p50_ms", "p95_ms", "p99_ms", "max_ms",
                "produce_ack", "receiver"},
    "retry": {"events", "history_rows", "complete_deliveries", "lateness", "lateness_from_start",
              "never_early", "receiver"},
}
THROUGHPUT_KEYS = {"deliveries", "deliveries_per_s", "wall_to_committed_s", "all_committed",
                   "cpu_s_per_1k", "cpu_s_per_1k_steady", "per_process", "exit_ok", "receiver"}
LATENESS_KEYS = {"samples", "min_ms", "p50_ms", "p99_ms", "max_ms"}


@pytest.mark.integration
@pytest.mark.timeout(420)
def test_bench_smoke_runs_and_writes_json(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.bench", "--smoke", "--out-dir", str(tmp_path)],
        check=False, cwd=REPO, capture_output=True, timeout=400,
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
    for run in ("metrics_on", "metrics_off"):
        missing = THROUGHPUT_KEYS - doc["phases"]["e2e"][run].keys()
        assert not missing, f"e2e.{run} lacks {missing}"
        assert doc["phases"]["e2e"][run]["deliveries"] >= doc["phases"]["e2e"][run]["events"]
    assert doc["phases"]["retry"]["lateness"].keys() >= LATENESS_KEYS
    assert doc["phases"]["latency"]["received"] == doc["phases"]["latency"]["produced"]
    assert doc["phases"]["retry"]["complete_deliveries"] == doc["phases"]["retry"]["events"]
    assert doc["table"] and {"phase", "figure", "value", "target", "met"} <= doc["table"][0].keys()
