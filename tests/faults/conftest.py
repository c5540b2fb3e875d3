"""Fault scenarios share the session's broker, CA and a work folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme

from tests.faults.harness import FaultEnv


@pytest.fixture(scope="session")
def fault_env(
    kafka: str,
    kafka_env: dict[str, str],
    ca: trustme.CA,
    ca_file: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> FaultEnv:
    return FaultEnv.create(kafka, ca, ca_file, tmp_path_factory.mktemp("faults"), kafka_env)
