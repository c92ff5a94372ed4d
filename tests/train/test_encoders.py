"""Tests for flowmill.train.encoders: a trained run's frozen text encoder, cached by `flowmill data encode`."""

import io

import numpy as np
import pytest

from flowmill.data.encode import encode_dataset, load_encoder
from flowmill.data.pack import PackOptions
from flowmill.errors import UsageError
from flowmill.train.encoders import text_encoder
from tests.encode_helpers import CAPTIONS, caption_dataset, mmdit_run_dir
from tests.helpers import shard_members


def test_text_embeddings_are_cached_per_sample(tmp_path):
    model, tokenizer = mmdit_run_dir(tmp_path / "run")
    caption_dataset(tmp_path / "data")
    encoder = load_encoder("flowmill.train.encoders:text_encoder", {"run_dir": str(tmp_path / "run")})
    lines = []
    manifest = encode_dataset(tmp_path / "data", tmp_path / "emb", encoder, encoder_spec="x", encoder_args={},
                              batch_size=3, keep=("cls",), options=PackOptions(progress=False), on_reject=lines.append)
    assert manifest["total_samples"] == 9 and manifest["fields"] == ["cls", "txt_emb.npy", "txt_mask.npy", "vec_emb.npy"]
    assert len(lines) == 1 and "k3" in lines[0] and "KeyError" in lines[0]
    files = shard_members(tmp_path / "emb")
    ids, mask = tokenizer.encode_padded([CAPTIONS[2]], 8)
    txt, vec = model(ids, mask)
    assert np.allclose(np.load(io.BytesIO(files["k7.txt_emb.npy"])), txt[0].numpy(), atol=1e-5)
    assert np.allclose(np.load(io.BytesIO(files["k7.vec_emb.npy"])), vec[0].numpy(), atol=1e-5)
    assert (np.load(io.BytesIO(files["k7.txt_mask.npy"])) == mask[0].numpy()).all() and files["k7.cls"] == b"7"
    again = encode_dataset(tmp_path / "data", tmp_path / "emb", encoder, encoder_spec="x", encoder_args={},
                           batch_size=3, keep=("cls",), options=PackOptions(progress=False), on_reject=lines.append)
    assert again == manifest and len(lines) == 1  # idempotent: nothing read the second time


def test_a_folder_that_is_no_text_run_is_refused(tmp_path):
    with pytest.raises(UsageError, match="is not a flowmill run dir"):
        text_encoder(str(tmp_path))
    (tmp_path / "config.yaml").write_text("task: flm\n")
    with pytest.raises(UsageError, match="has no text section"):
        text_encoder(str(tmp_path))
