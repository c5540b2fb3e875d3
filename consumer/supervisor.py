"""`run --role all` (and `--role deliver --workers N`): child processes, supervised.

Each role runs in a process of its own (`python -m consumer run --role R --worker I`), so the
embedded ClickHouse engine lives only in the history process and the deliver workers share
no GIL. A child that dies is started again after a back-off (1 s, doubling to 30 s); one that
dies `MAX_RESTARTS` times within `RESTART_WINDOW_S` stops the whole with exit code 1, so a
process manager above (systemd, Kubernetes) sees the failure. SIGTERM or SIGINT is passed to
every child; each drains, and the supervisor exits 0 when all of them did.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Final

log = logging.getLogger(__name__)

MAX_RESTARTS: Final = 5
# Exits no restart can mend: 2, settings that do not load; 78 (EX_CONFIG), a setting the
# process found wrong while starting (refused Kafka credentials, a bad endpoints file).
FATAL_EXITS: Final = frozenset({2, 78})
RESTART_WINDOW_S: Final = 300.0
BACKOFF_MAX_S: Final = 30.0
_TICK_S: Final = 0.2
PR_SET_PDEATHSIG: Final = 1


@dataclass
class Child:
    role: str
    worker: int = 0
    proc: subprocess.Popen[bytes] | None = None
    deaths: deque[float] = field(default_factory=deque)
    backoff_s: float = 1.0
    start_at: float = 0.0

    @property
    def name(self) -> str:
        return self.role if self.role == "history" else f"{self.role}-{self.worker}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "consumer", "run", "--role", self.role, "--worker", str(self.worker)]


class Supervisor:
    def __init__(self, children: list[Child], drain_timeout_s: float) -> None:
        self.children = children
        self._grace_s = drain_timeout_s + 15
        self._stopping = False
        self.exit_code = 1  # when a child fails for good

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        for child in self.children:
            self._start(child)
        failed = False
        while not self._stopping and not failed:
            time.sleep(_TICK_S)
            failed = self._watch()
        return self._stop_all(failed)

    def _on_signal(self, signum: int, frame: object) -> None:
        log.info("supervisor: %s received, draining every child", signal.Signals(signum).name)
        self._stopping = True

    def _start(self, child: Child) -> None:
        # The supervisor runs no other thread, so preexec_fn is safe here.
        child.proc = subprocess.Popen(
            child.command(), env=os.environ.copy(), preexec_fn=_die_with_parent  # noqa: PLW1509
        )
        log.info("supervisor: started %s (pid %d)", child.name, child.proc.pid)

    def _watch(self) -> bool:
        """Restart what died; True when one died too often (the whole must stop)."""
        now = time.monotonic()
        for child in self.children:
            proc = child.proc
            if proc is None:
                if now >= child.start_at:
                    self._start(child)
                continue
            code = proc.poll()
            if code is None:
                if now - (child.deaths[-1] if child.deaths else 0.0) > RESTART_WINDOW_S:
                    child.backoff_s = 1.0  # it has been up a while: forget its past
                continue
            if code in FATAL_EXITS:
                log.error("supervisor: %s cannot start: a setting is wrong (its log says which); "
                          "stopping everything", child.name)
                child.proc = None
                self.exit_code = code
                return True
            child.deaths.append(now)
            while child.deaths and now - child.deaths[0] > RESTART_WINDOW_S:
                child.deaths.popleft()
            if len(child.deaths) > MAX_RESTARTS:
                log.error("supervisor: %s exited %d, its %d-th death in %.0fs: stopping everything",
                          child.name, code, len(child.deaths), RESTART_WINDOW_S)
                child.proc = None
                return True
            log.error("supervisor: %s exited %d; starting it again in %.0fs",
                      child.name, code, child.backoff_s)
            child.proc = None
            child.start_at = now + child.backoff_s
            child.backoff_s = min(child.backoff_s * 2, BACKOFF_MAX_S)
        return False

    def _stop_all(self, failed: bool) -> int:
        running = [c for c in self.children if c.proc is not None and c.proc.poll() is None]
        for child in running:
            assert child.proc is not None
            child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self._grace_s
        codes = []
        for child in self.children:
            if child.proc is None:
                continue
            try:
                code = child.proc.wait(max(0.1, deadline - time.monotonic()))
                # -15: the SIGTERM came while the child's interpreter was still starting, before
                # it could install its handler: it had taken no work yet, so that is a clean stop.
                codes.append(0 if code == -signal.SIGTERM else code)
            except subprocess.TimeoutExpired:
                log.error("supervisor: %s did not stop within %.0fs; killing it", child.name, self._grace_s)
                child.proc.kill()
                codes.append(child.proc.wait())
        if failed or any(code != 0 for code in codes):
            log.error("supervisor: stopped, exit codes %s", codes)
            return self.exit_code
        log.info("supervisor: every child drained and exited 0")
        return 0


def _die_with_parent() -> None:
    """In the child before exec: a SIGTERM when the supervisor dies (even by kill -9), so no
    orphaned role keeps running unsupervised; it drains as on any SIGTERM (Linux prctl)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the child outlives a killed supervisor
        pass


def children_for(role: str, workers: int) -> list[Child]:
    """`all`: the history process and N deliver workers; `deliver`: N deliver workers."""
    out = [Child("history")] if role == "all" else []
    out += [Child("deliver", i) for i in range(workers)]
    return out
