"""The real history role (`perkamo-webhooks run --role history`) with a fault hook in its store.

`python -m tests.faults.faulty_run` builds the role exactly as `run` does, around a store whose
inserts read control files in $FAULTS_CONTROL_DIR (`before_insert`, and a wrapped `insert`):
- `history-down` exists: the insert raises (the store is unreachable);
- `history-slow` exists: the insert waits 2 s first;
- `history-hold-commit` exists: after an insert succeeded, the role waits 5 s before it may
  commit, and writes `history-inserted` first: a kill -9 then lands with the rows in the
  store and their offsets uncommitted (the restarted role inserts them again).
A test flips these files while the process runs; SIGTERM drains as usual.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from consumer import logsetup
from consumer.config import load_settings
from consumer.history import HistoryStore
from consumer.history_role import build_history, serve_history
from consumer.models import AttemptRow

CONTROL_ENV = "FAULTS_CONTROL_DIR"
DOWN = "history-down"
SLOW = "history-slow"
HOLD_COMMIT = "history-hold-commit"
INSERTED = "history-inserted"
SLOW_S = 2.0
HOLD_S = 5.0


def history_fault_hook(control: Path) -> Callable[[], None]:
    def before_insert() -> None:
        if (control / DOWN).exists():
            raise RuntimeError("history store down (fault injection)")
        if (control / SLOW).exists():
            time.sleep(SLOW_S)

    return before_insert


Insert = Callable[[Sequence[AttemptRow]], None]


def hold_commit_hook(insert: Insert, control: Path) -> Insert:
    def insert_then_hold(rows: Sequence[AttemptRow]) -> None:
        insert(rows)
        if (control / HOLD_COMMIT).exists():
            (control / INSERTED).write_text(str(len(rows)))
            time.sleep(HOLD_S)

    return insert_then_hold


def main() -> int:
    settings = load_settings()
    logsetup.configure(settings.log_level, settings.log_format, tag="history")
    store = HistoryStore(settings.history_dsn_resolved)
    control = os.environ.get(CONTROL_ENV)
    if control:
        store.before_insert = history_fault_hook(Path(control))
        store.insert = hold_commit_hook(store.insert, Path(control))  # type: ignore[method-assign]
    role = build_history(settings, store=store)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve_history(role))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
