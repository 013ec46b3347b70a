"""Shared fixtures. Kafka fixtures live in ``kafka_fixtures.py``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.shell.registry import RUNTIME_DIR_ENV
from runtime.shell.security import TOKEN_ENV


@pytest.fixture(autouse=True, scope="session")
def job_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The job registry of the whole session, a temporary directory (``$PYFLOW_RUNTIME_DIR``,
    which the jobs the tests start inherit): the user's own jobs never mix with the tests', and
    no ``$PYFLOW_TOKEN`` of the user's reaches a test."""
    directory = tmp_path_factory.mktemp("pyflow-runtime")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(RUNTIME_DIR_ENV, str(directory))
        patch.delenv(TOKEN_ENV, raising=False)
        yield directory
