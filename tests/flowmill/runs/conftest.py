"""The MLflow store the tests of flowmill.runs read (see store_fixture.py)."""

from __future__ import annotations

import pytest

from tests.flowmill.runs.store_fixture import make_store


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A runs root with one SQLite store: experiment "digits" with runs a (run dir, SLURM job) and b (resumed), "other" with c."""
    return make_store(tmp_path_factory.mktemp("runs"))
