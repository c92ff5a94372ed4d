"""Shared fixtures: the packed digits with their tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """scikit-learn's digits packed into 8 shards, with a sentencepiece tokenizer beside them."""
    from flowmill.data.builtin import digit_captions, pack_builtin_digits
    from flowmill.data.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("digits")
    pack_builtin_digits(out, shard_size=225, progress=False)
    train_tokenizer(digit_captions(), out / "tokenizer", vocab_size=32)
    return out
