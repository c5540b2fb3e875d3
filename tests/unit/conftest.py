"""Unit-test fixtures: no broker, no network; every test starts from a clean PERKAMO_* env."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def clean_perkamo_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read PERKAMO_* from the process env; unit tests must not see the caller's."""
    for name in list(os.environ):
        if name.startswith("PERKAMO_"):
            monkeypatch.delenv(name)
