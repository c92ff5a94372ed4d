"""flowmill.train.judge: trained once per (data, settings), cached, better than uniform on held-out text."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from flowmill.data.pack import write_shards
from flowmill.train import judge as judge_module
from flowmill.train.judge import JudgeConfig, held_out_tokens, judge_dir, load_or_train_judge, text_data_info
from flowmill.train.text_metrics import mean_nll
from tests.text_helpers import SEQ_LEN, pack_tiny_text

SETTINGS = JudgeConfig(dim=32, depth=1, num_heads=2, steps=60, batch_size=16, lr=3e-3)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return pack_tiny_text(tmp_path_factory.mktemp("text"), chars=20_000)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread


def test_text_data_info_reads_the_manifest(text, tmp_path):
    info = text_data_info(text.train)
    assert (info.vocab_size, info.seq_len) == (text.vocab_size, SEQ_LEN)
    assert len(info.shards_sha256) >= 2
    write_shards([{"__key__": "a", "txt": "a caption"}], tmp_path / "captions", source="images", args={}, shard_samples=1, progress=False)
    with pytest.raises(ValueError, match="holds 'images' samples, not packed text"):
        text_data_info(tmp_path / "captions")


def test_judge_is_trained_once_and_cached(text, tmp_path, monkeypatch):
    config = dataclasses.replace(SETTINGS, cache_dir=str(tmp_path / "judges"))
    state = torch.get_rng_state()
    model, record = load_or_train_judge(text.train, config, val_path=text.val)
    assert torch.equal(torch.get_rng_state(), state)  # a run's global RNG stream is left alone
    assert (judge_dir(text.train, config) / "judge.json").is_file()
    # Better than uniform on held-out text, and the record says so.
    assert record["val_ppl"] < 0.8 * text.vocab_size
    val = held_out_tokens(text.val, text_data_info(text.train))
    assert record["val_ppl"] == pytest.approx(math.exp(mean_nll(model, val)), rel=1e-5)

    def no_training(*args, **kwargs):
        raise AssertionError("the cached judge was trained again")

    monkeypatch.setattr(judge_module, "train_judge", no_training)
    again, again_record = load_or_train_judge(text.train, config)
    assert again_record == record
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    other = dataclasses.replace(config, steps=61)
    assert judge_dir(text.train, other) != judge_dir(text.train, config)  # other settings, another judge
    with pytest.raises(AssertionError, match="trained again"):
        load_or_train_judge(text.train, other)
