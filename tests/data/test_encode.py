"""Tests for flowmill.data.encode: caching a frozen encoder's outputs as shards."""

import io

import numpy as np
import pytest

from flowmill.cli import main
from flowmill.data.decode import image_uint8
from flowmill.data.encode import encode_dataset, load_encoder
from flowmill.data.pack import PackOptions, write_shards
from flowmill.data.shards import read_manifest
from flowmill.models.loading import load_vae
from tests.encode_helpers import CAPTIONS, ByteEncoder, caption_dataset
from tests.helpers import shard_members
from tests.latent_helpers import encode_digits, random_vae


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


def test_vae_latents_hold_the_posterior_and_the_manifest_names_the_vae(digits_dir, tmp_path):
    vae = random_vae(tmp_path / "vae")
    manifest = encode_digits(digits_dir, vae, tmp_path / "latents")
    latents = manifest["latents"]
    assert manifest["fields"] == ["cls", "latent_mean.npy", "latent_std.npy", "txt"]
    assert latents["vae"] == str(vae) and latents["vae_sha256"] == load_vae(vae).sha256 and latents["shape"] == [4, 8, 8]
    files = shard_members(tmp_path / "latents")
    space = load_vae(vae)
    image = image_uint8(shard_members(digits_dir)["digits-000007.png"], 1).float()[None] / 127.5 - 1.0
    mean, std = space.posterior(image)
    assert np.allclose(np.load(io.BytesIO(files["digits-000007.latent_mean.npy"])), mean[0].numpy(), atol=1e-5)
    assert np.allclose(np.load(io.BytesIO(files["digits-000007.latent_std.npy"])), std[0].numpy(), atol=1e-5)
    assert files["digits-000007.txt"] == shard_members(digits_dir)["digits-000007.txt"] and files["digits-000007.cls"] == b"7"

    # The VAE has no scaling factor: it is measured, the std of the posterior samples over every element.
    means = np.stack([np.load(io.BytesIO(data)) for name, data in files.items() if name.endswith("latent_mean.npy")])
    stds = np.stack([np.load(io.BytesIO(data)) for name, data in files.items() if name.endswith("latent_std.npy")])
    draws = means + stds * np.random.default_rng(0).standard_normal((20, *means.shape))
    assert latents["measured"] == ["scaling_factor", "shift_factor"]
    assert latents["scaling_factor"] == pytest.approx(1 / draws.std(), rel=2e-3)
    assert latents["shift_factor"] == pytest.approx(means.mean(), abs=1e-6)


def test_a_vae_with_factors_keeps_them_and_a_missing_shift_stays_missing(digits_dir, tmp_path):
    with_both = encode_digits(digits_dir, random_vae(tmp_path / "both", 1.5, 0.25), tmp_path / "a")["latents"]
    assert (with_both["scaling_factor"], with_both["shift_factor"], with_both["measured"]) == (1.5, 0.25, [])
    scale_only = encode_digits(digits_dir, random_vae(tmp_path / "scale", 0.5), tmp_path / "b")["latents"]
    assert (scale_only["scaling_factor"], scale_only["shift_factor"], scale_only["measured"]) == (0.5, None, [])


def test_two_processes_write_the_same_latents_as_one(digits_dir, tmp_path):
    vae = random_vae(tmp_path / "vae")
    one = encode_digits(digits_dir, vae, tmp_path / "one")
    two = encode_digits(digits_dir, vae, tmp_path / "two", processes=2)
    assert two["shards"] == one["shards"] and two["latents"] == one["latents"]


def test_encode_vae_command_keeps_what_is_there_and_rejects_bad_images(digits_dir, tmp_path, capsys):
    vae = random_vae(tmp_path / "vae")
    samples = [{"__key__": "a", "png": shard_members(digits_dir)["digits-000000.png"]}, {"__key__": "b", "png": b"not a png"}]
    write_shards(samples, tmp_path / "data", source="test", args={}, shard_samples=4, progress=False)
    code = main(["data", "encode", str(tmp_path / "data"), str(tmp_path / "out"), "--vae", str(vae), "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "skipping b in" in captured.err and "1 samples skipped" in captured.out
    assert "latents 4x8x8: scaling_factor" in captured.out and "measured on the data: scaling_factor, shift_factor" in captured.out
    assert read_manifest(tmp_path / "out")["fields"] == ["latent_mean.npy", "latent_std.npy"]  # no txt, cls to keep

    with pytest.raises(SystemExit) as exit_:
        main(["data", "encode", str(tmp_path / "data"), str(tmp_path / "out2"), "--vae", str(vae), "--encoder", "x:y"])
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    code = main(["data", "encode", str(tmp_path / "data"), str(tmp_path / "out2"), "--vae", str(tmp_path / "nothing")])
    assert code == 2 and "nothing does not exist" in capsys.readouterr().err
