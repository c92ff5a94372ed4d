"""Tests for flowmill.data.encode: caching a frozen encoder's outputs as shards."""

import io

import numpy as np
import pytest

from flowmill.data.encode import encode_dataset, load_encoder
from flowmill.data.pack import PackOptions
from tests.encode_helpers import CAPTIONS, ByteEncoder, caption_dataset
from tests.helpers import shard_members


def test_outputs_are_cached_per_sample_with_the_kept_fields(tmp_path):
    caption_dataset(tmp_path / "data")
    encoder = load_encoder("tests.encode_helpers:byte_encoder", {"width": 4})
    lines = []
    manifest = encode_dataset(tmp_path / "data", tmp_path / "out", encoder, encoder_spec="tests.encode_helpers:byte_encoder",
                              encoder_args={"width": 4}, batch_size=3, keep=("cls",), dtype="float16",
                              options=PackOptions(progress=False), on_reject=lines.append)
    assert manifest["total_samples"] == 9 and manifest["fields"] == ["cls", "codes.npy", "total.npy"]
    assert [shard["samples"] for shard in manifest["shards"]] == [9]  # the encode default, 1000 samples a shard
    assert manifest["made"]["params"]["args"]["description"] == {"encoder": "bytes", "width": 4}
    assert len(lines) == 1 and "k3" in lines[0] and "KeyError" in lines[0]
    assert manifest["made"]["notes"]["rejected"][0]["input"].endswith(":k3")
    files = shard_members(tmp_path / "out")
    codes = np.load(io.BytesIO(files["k7.codes.npy"]))
    assert codes.dtype == np.float16 and codes.tolist() == list(CAPTIONS[2].encode()[:4])
    assert np.load(io.BytesIO(files["k7.total.npy"])) == sum(CAPTIONS[2].encode()[:4]) and files["k7.cls"] == b"7"
    again = encode_dataset(tmp_path / "data", tmp_path / "out", encoder, encoder_spec="tests.encode_helpers:byte_encoder",
                           encoder_args={"width": 4}, batch_size=3, keep=("cls",), dtype="float16",
                           options=PackOptions(progress=False), on_reject=lines.append)
    assert again == manifest and len(lines) == 1  # idempotent: nothing read the second time


def test_shard_limits_come_from_the_options(tmp_path):
    caption_dataset(tmp_path / "data")
    manifest = encode_dataset(tmp_path / "data", tmp_path / "out", ByteEncoder(), encoder_spec="x", encoder_args={},
                              options=PackOptions(shard_samples=4, progress=False), on_reject=lambda line: None)
    assert [shard["samples"] for shard in manifest["shards"]] == [4, 4, 1]


def test_bad_encoder_specs_are_explained():
    with pytest.raises(ValueError, match="must be 'module:callable'"):
        load_encoder("flowmill.data.encode", {})
    with pytest.raises(ValueError, match="cannot load encoder 'flowmill.data.encode:nothing'"):
        load_encoder("flowmill.data.encode:nothing", {})
    with pytest.raises(TypeError, match="has no 'decode', 'description'"):
        load_encoder("builtins:dict", {})
