"""The supervisor of `run --role all` with real child processes (tiny Python scripts)."""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from consumer import supervisor as sup
from consumer.supervisor import Child, Supervisor, children_for


class Script(Child):
    """A child that runs a Python snippet instead of a role."""

    def __init__(self, code: str, role: str = "deliver") -> None:
        super().__init__(role)
        self.code = code

    def command(self) -> list[str]:
        return [sys.executable, "-c", self.code]


def test_all_is_one_history_process_and_the_deliver_workers() -> None:
    assert [c.name for c in children_for("all", 2)] == ["history", "deliver-0", "deliver-1"]
    assert [c.name for c in children_for("deliver", 3)] == ["deliver-0", "deliver-1", "deliver-2"]
    assert children_for("all", 1)[1].command()[-4:] == ["--role", "deliver", "--worker", "0"]


def test_a_child_that_keeps_dying_stops_everything_with_1(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sup, "MAX_RESTARTS", 2)
    monkeypatch.setattr(sup, "BACKOFF_MAX_S", 0.1)
    dying = Script("import sys; sys.exit(3)")
    dying.backoff_s = 0.05
    calm = Script("import time; time.sleep(60)", role="history")
    started = time.monotonic()
    code = Supervisor([calm, dying], drain_timeout_s=1).run()
    assert code == 1
    assert len(dying.deaths) == 3  # started again twice, then given up
    assert time.monotonic() - started < 20
    assert calm.proc is not None and calm.proc.poll() is not None  # stopped too


def test_a_setting_error_is_not_restarted(monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = Script("import sys; sys.exit(78)")
    assert Supervisor([wrong], drain_timeout_s=1).run() == 78
    assert not wrong.deaths  # never started again


def test_sigterm_drains_every_child_and_exits_0(tmp_path: Path) -> None:
    marker = tmp_path / "drained"
    code = (
        "import signal, sys, time, pathlib\n"
        "def stop(*_):\n"
        f"    pathlib.Path({str(marker)!r}).write_text('yes'); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "time.sleep(60)\n"
    )
    children = [Script(code, role="history"), Script(code)]
    supervisor = Supervisor(children, drain_timeout_s=1)
    threading.Timer(1.5, lambda: supervisor._on_signal(signal.SIGTERM, None)).start()
    assert supervisor.run() == 0
    assert marker.read_text() == "yes"


def test_a_sigterm_while_children_still_start_is_a_clean_stop() -> None:
    """A child signalled before its interpreter installed a handler dies with -15: it had
    taken no work, so the supervisor still exits 0 (found by the fault suite)."""
    children = [Script("import time; time.sleep(60)", role="history"), Script("import time; time.sleep(60)")]
    supervisor = Supervisor(children, drain_timeout_s=1)
    threading.Timer(0.5, lambda: supervisor._on_signal(signal.SIGTERM, None)).start()
    assert supervisor.run() == 0
