"""A full disk under the real embedded engine: the history role's log line names it (issue 20)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

FILL_SCRIPT = """
import os, sys
from datetime import UTC, datetime
from consumer.history import HistoryStore
from consumer.models import AttemptRow
from consumer.store_errors import cause_of

store = HistoryStore("chdb://" + sys.argv[1])
store.migrate(90)
now = datetime.now(UTC)
for n in range(200):
    row = AttemptRow("dlv_" + str(n), 1, "evt", "a.b", "s", "live", "ep", "h", "u", "t", "initial",
                     "delivered", 204, "", 1, "", now, None, os.urandom(400_000).hex(), "", "t", 0, n)
    try:
        store.insert([row])
    except Exception as exc:
        print(cause_of(exc))
        print(exc, file=sys.stderr)
        break
"""


@pytest.mark.timeout(120)
def test_a_full_disk_under_the_embedded_engine_names_itself(tmp_path: Path) -> None:
    """The real engine on a real full filesystem (a small tmpfs: needs root to mount)."""
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                             check=False, capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(FILL_SCRIPT), str(mount / "db")],
                              check=False, capture_output=True, text=True, timeout=110)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
    assert done.returncode == 0, done.stderr
    said = done.stdout.strip()
    assert said.startswith("DatabaseError: code ") and ("space" in said.lower()), said
