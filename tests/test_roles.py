"""The roles as processes: the deliver role holds no history store, `all` supervises both."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson

from consumer.config import load_settings
from consumer.kafka_topics import ensure_topics
from consumer.topics import plan
from tests.support import free_port, make_event, produce, unique, wait_for

REPO = Path(__file__).resolve().parents[1]


def _modules_of(pid: int) -> str:
    """The shared objects mapped into a process (what is in its address space)."""
    return Path(f"/proc/{pid}/maps").read_text()


async def test_the_deliver_role_has_no_clickhouse_in_its_address_space(harness, receiver):
    space = unique("roles")
    endpoints = harness.endpoints_file([{"space": space, "url": receiver.url("/roles")}])
    env = {
        **os.environ,
        "PERKAMO_KAFKA_BOOTSTRAP_SERVERS": harness.kafka,
        "PERKAMO_EVENTS_TOPICS": harness.events_topic,
        "PERKAMO_GROUP_ID": harness.group,
        "PERKAMO_DATA_DIR": str(harness.tmp_path / "deliver"),
        "PERKAMO_ENDPOINTS_FILE": str(endpoints),
        "PERKAMO_ALLOW_PRIVATE_NETWORKS": "127.0.0.0/8,::1/128",
        "PERKAMO_CA_BUNDLE": str(harness.ca_file),
        "PERKAMO_DELIVER_ADMIN_LISTEN": f"127.0.0.1:{free_port()}",
    }
    # The role checks its topics at start-up: those of the default tiers must exist too.
    defaults = load_settings(kafka_bootstrap_servers=harness.kafka, events_topics=[harness.events_topic])
    specs, _ = plan(defaults, partitions=3, retention_hours=None)
    ensure_topics(harness.kafka, [(s.name, s.partitions, s.config) for s in specs])
    log_path = harness.tmp_path / "deliver.log"  # a file: an unread pipe would fill and block it
    proc = subprocess.Popen([sys.executable, "-m", "consumer", "run", "--role", "deliver"],
                            env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log_path.open("wb"))
    try:
        produce(harness.kafka, harness.events_topic, [orjson.dumps(make_event(space))])
        await wait_for(lambda: receiver.to("/roles"), timeout=60, what="a delivery by the deliver role")
        maps = _modules_of(proc.pid)
        assert "chdb" not in maps and "libclickhouse" not in maps
        code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); import consumer.deliver_role, "
                "consumer.cli; print(sorted(m for m in sys.modules if m.startswith(('chdb', "
                "'clickhouse_connect', 'pandas', 'consumer.history'))))")
        loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        assert loaded.stdout.strip() == "[]"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, log_path.read_text(errors="replace")[-2000:]
    assert not (harness.tmp_path / "deliver" / "history").exists()


def test_all_runs_both_roles_and_drains_them_on_sigterm(kafka, tmp_path):
    # Each role checks its topics at start-up: the default ones must exist (`topics`).
    specs, _ = plan(load_settings(kafka_bootstrap_servers=kafka), partitions=1, retention_hours=None)
    ensure_topics(kafka, [(s.name, s.partitions, s.config) for s in specs])
    history, deliver = free_port(), free_port()
    env = {
        **os.environ,
        "PERKAMO_KAFKA_BOOTSTRAP_SERVERS": kafka,
        "PERKAMO_DATA_DIR": str(tmp_path),
        "PERKAMO_GROUP_ID": unique("all"),
        "PERKAMO_HISTORY_GROUP_ID": unique("all-history"),
        "PERKAMO_ADMIN_LISTEN": f"127.0.0.1:{history}",
        "PERKAMO_DELIVER_ADMIN_LISTEN": f"127.0.0.1:{deliver}",
    }
    log_path = tmp_path / "all.log"
    proc = subprocess.Popen([sys.executable, "-m", "consumer", "run", "--role", "all", "--workers", "2"],
                            env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log_path.open("wb"))
    try:
        deadline = time.monotonic() + 90
        pending = {history, deliver, deliver + 1}
        while pending and time.monotonic() < deadline:
            for port in list(pending):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                        if r.status == 200:
                            pending.discard(port)
                except OSError:
                    pass
            time.sleep(0.5)
        assert not pending, f"not ready: {sorted(pending)}"
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0, log_path.read_text(errors="replace")[-3000:]


def test_a_bad_endpoints_file_stops_all_with_exit_78_and_no_restart(tmp_path):
    """A wrong setting is not mended by a restart: the child says which setting, exits 78
    (EX_CONFIG), the supervisor stops the other role cleanly and exits 78 too."""
    bad = tmp_path / "endpoints.json"
    bad.write_text('[{"space": "x"}]')
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PERKAMO_")},
        "PERKAMO_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1",  # never reached: the file is read first
        "PERKAMO_DATA_DIR": str(tmp_path / "data"),
        "PERKAMO_ENDPOINTS_FILE": str(bad),
        "PERKAMO_ADMIN_LISTEN": f"127.0.0.1:{free_port()}",
        "PERKAMO_DELIVER_ADMIN_LISTEN": f"127.0.0.1:{free_port()}",
    }
    done = subprocess.run([sys.executable, "-m", "consumer", "run", "--role", "all"], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 78, done.stderr[-2000:]
    assert "PERKAMO_ENDPOINTS_FILE" in done.stderr and "record 0: url is required" in done.stderr
    assert "starting it again" not in done.stderr
    assert "cannot open history store" not in done.stderr  # a stop during start-up is no fault
