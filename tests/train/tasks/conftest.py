"""Shared by the FLM and FMLM task tests: a tiny packed text, a judge cache, and one finished FLM run.

Session-scoped: the FMLM tests distil the same FLM run that the FLM tests read, so it is trained
once per test process, not once per module.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import flowmill_ok
from tests.text_helpers import FLM_TINY, SIX_STEPS, TinyText, flm_model_overrides, flm_overrides, pack_tiny_text


@pytest.fixture(scope="session")
def text(tmp_path_factory) -> TinyText:
    return pack_tiny_text(tmp_path_factory.mktemp("text"))


@pytest.fixture(scope="session")
def judges(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("judges")


@pytest.fixture(scope="session")
def flm_run(text, judges, tmp_path_factory) -> Path:
    """A finished 6-step FLM run with checkpoints at 3 and 6 (read-only)."""
    root = tmp_path_factory.mktemp("flm")
    overrides = {**SIX_STEPS, **flm_model_overrides(text), "judge.cache_dir": judges}
    flowmill_ok("train", str(FLM_TINY), *flm_overrides(text, root / "run", **overrides), cwd=root)
    return root / "run"
