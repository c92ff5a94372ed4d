"""Tests for flowmill.data.encode: caching a frozen encoder's outputs as shards."""

import argparse
import io

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from flowmill.data import cli
from flowmill.data.encode import encode_dataset, load_encoder
from flowmill.data.pack import write_shards
from flowmill.data.tokenizer import Tokenizer, train_tokenizer
from flowmill.models.text_encoder import TextEncoder, TextEncoderConfig
from tests.helpers import shard_members

CAPTIONS = ["a red cat", "a blue dog", "two green birds", "one cat", "the dog sleeps"]


def run_dir(folder) -> tuple[TextEncoder, Tokenizer]:
    """A minimal MMDiT run dir: config.yaml with a text section, tokenizer, frozen text encoder weights."""
    folder.mkdir()
    tokenizer = Tokenizer.load(train_tokenizer(CAPTIONS, folder / "tokenizer", vocab_size=40))
    section = {"dim": 16, "depth": 1, "num_heads": 2, "max_length": 8, "seed": 3}
    (folder / "config.yaml").write_text(yaml.safe_dump({"task": "mmdit", "text": section}))
    model = TextEncoder(TextEncoderConfig(**section), tokenizer.vocab_size, tokenizer.pad_id, tokenizer.bos_id,
                        tokenizer.eos_id)
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, folder / "text_encoder.safetensors")
    return model, tokenizer


def dataset(folder) -> None:
    samples = [{"__key__": f"k{index}", "txt": caption, "cls": str(index)} for index, caption in enumerate(CAPTIONS * 2)]
    samples[3] = {"__key__": "k3", "cls": "3"}  # no caption: the encoder rejects it
    write_shards(samples, folder, source="test", args={}, shard_samples=4, progress=False)


def test_text_embeddings_are_cached_per_sample(tmp_path):
    model, tokenizer = run_dir(tmp_path / "run")
    dataset(tmp_path / "data")
    encoder = load_encoder("flowmill.data.encode:text_encoder", {"run_dir": str(tmp_path / "run")})
    lines = []
    manifest = encode_dataset(tmp_path / "data", tmp_path / "emb", encoder, encoder_spec="x", encoder_args={},
                              batch_size=3, keep=("cls",), progress=False, on_reject=lines.append)
    assert manifest["total_samples"] == 9 and manifest["fields"] == ["cls", "txt_emb.npy", "txt_mask.npy", "vec_emb.npy"]
    assert len(lines) == 1 and "k3" in lines[0] and "KeyError" in lines[0]
    files = shard_members(tmp_path / "emb")
    ids, mask = tokenizer.encode_padded([CAPTIONS[2]], 8)
    txt, vec = model(ids, mask)
    assert np.allclose(np.load(io.BytesIO(files["k7.txt_emb.npy"])), txt[0].numpy(), atol=1e-5)
    assert np.allclose(np.load(io.BytesIO(files["k7.vec_emb.npy"])), vec[0].numpy(), atol=1e-5)
    assert (np.load(io.BytesIO(files["k7.txt_mask.npy"])) == mask[0].numpy()).all() and files["k7.cls"] == b"7"
    again = encode_dataset(tmp_path / "data", tmp_path / "emb", encoder, encoder_spec="x", encoder_args={},
                           batch_size=3, keep=("cls",), progress=False, on_reject=lines.append)
    assert again == manifest and len(lines) == 1  # idempotent: nothing read the second time


def test_encode_command(tmp_path, capsys):
    run_dir(tmp_path / "run")
    dataset(tmp_path / "data")
    parser = argparse.ArgumentParser(prog="flowmill")
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "encode", str(tmp_path / "data"), str(tmp_path / "emb"), "--encoder",
                              "flowmill.data.encode:text_encoder", "--arg", f"run_dir={tmp_path / 'run'}",
                              "--dtype", "float16", "--keep", "txt", "--quiet", "--threads", "1"])
    threads = torch.get_num_threads()
    try:
        assert args.func(args) == 0  # k3 has no txt to keep: skipped, the rest is written
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    assert "9 samples in 1 shards" in captured.out and "1 samples skipped" in captured.out
    assert "skipping k3" in captured.err
    assert np.load(io.BytesIO(shard_members(tmp_path / "emb")["k0.vec_emb.npy"])).dtype == np.float16


def test_bad_encoder_specs_are_explained():
    with pytest.raises(ValueError, match="must be 'module:callable'"):
        load_encoder("flowmill.data.encode", {})
    with pytest.raises(ValueError, match="cannot load encoder 'flowmill.data.encode:nothing'"):
        load_encoder("flowmill.data.encode:nothing", {})
    with pytest.raises(TypeError, match="has no 'decode', 'description'"):
        load_encoder("builtins:dict", {})
    assert cli.parse_assignment("size=32") == ("size", 32) and cli.parse_assignment("path=a/b") == ("path", "a/b")
