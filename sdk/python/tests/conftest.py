from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import pytest

from stack import Postgres, Stack, find_binary, need


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    pg = Postgres()
    try:
        yield pg
    finally:
        pg.stop()


@pytest.fixture(scope="session")
def binary() -> Path:
    b = find_binary()
    if b is None:
        need("no ge-orchestrator binary: build it (cargo build --release) or set GE_ORCHESTRATOR_BIN")
    return b  # type: ignore[return-value]


@pytest.fixture
def stack(request: pytest.FixtureRequest, tmp_path: Path, postgres: Postgres, binary: Path) -> Iterator[Stack]:
    s = Stack(tmp_path, postgres, binary, request.node.name)
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(autouse=True)
def _logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ge_orchestrator")


def pytest_report_header() -> str:
    import ge_orchestrator

    return f"ge_orchestrator {ge_orchestrator.__version__} from {ge_orchestrator.__file__}; binary {find_binary()}"
