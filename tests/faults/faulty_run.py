"""The real history role (`perkamo-webhooks run --role history`) with a fault hook in its store.

`python -m tests.faults.faulty_run` builds the role exactly as `run` does, then installs
`role.store.before_insert`, which reads control files in $FAULTS_CONTROL_DIR before each insert:
- `history-down` exists: the insert raises (the store is unreachable);
- `history-slow` exists: the insert waits 2 s first.
A test flips these files while the process runs; SIGTERM drains as usual.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

from consumer import logsetup
from consumer.config import load_settings
from consumer.history_role import build_history, serve_history

CONTROL_ENV = "FAULTS_CONTROL_DIR"
DOWN = "history-down"
SLOW = "history-slow"
SLOW_S = 2.0


def history_fault_hook(control: Path) -> Callable[[], None]:
    def before_insert() -> None:
        if (control / DOWN).exists():
            raise RuntimeError("history store down (fault injection)")
        if (control / SLOW).exists():
            time.sleep(SLOW_S)

    return before_insert


def main() -> int:
    settings = load_settings()
    logsetup.configure(settings.log_level, settings.log_format, tag="history")
    role = build_history(settings)
    control = os.environ.get(CONTROL_ENV)
    if control:
        role.store.before_insert = history_fault_hook(Path(control))
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve_history(role))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
