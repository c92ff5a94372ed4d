"""Tests for flowmill.train.tasks.latents: the MMDiT task on VAE latents (a tiny random VAE)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from flowmill.cli import main
from flowmill.errors import UsageError
from flowmill.models.loading import load_vae
from flowmill.run_dir import RunDir
from flowmill.train.config import load_config
from flowmill.train.distributed import DistEnv
from flowmill.train.tasks.mmdit import MMDiTTask
from tests.helpers import TINY_CONFIG, flowmill_ok, read_jsonl, tiny_overrides
from tests.latent_helpers import encode_digits, random_vae

# The tiny MMDiT on 8x8x4 latents: patch 2 gives the pixel model's 16 image tokens.
LATENT_MODEL = {"model.in_channels": 4, "model.out_channels": 4, "model.sample_size": 8, "model.patch_size": 2,
                "model.pos_embed_max_size": 4}


@pytest.fixture(scope="module")
def latent_digits(digits_dir, tmp_path_factory):
    """(VAE folder, the digits encoded by it) (read-only)."""
    root = tmp_path_factory.mktemp("latent")
    vae = random_vae(root / "vae")
    encode_digits(digits_dir, vae, root / "latents")
    return vae, root / "latents"


def latent_task(digits_dir, latents, run_dir, **overrides) -> MMDiTTask:
    run_dir.mkdir(exist_ok=True)
    values = {"data.path": latents, **LATENT_MODEL, **overrides}
    cfg = load_config(TINY_CONFIG, tiny_overrides(digits_dir, run_dir, **values))
    return MMDiTTask(cfg, DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu")), RunDir(run_dir))


def test_training_draws_scaled_posterior_samples_or_means(digits_dir, latent_digits, tmp_path):
    vae, latents = latent_digits
    task = latent_task(digits_dir, latents, tmp_path / "run")
    section = json.loads((latents / "manifest.json").read_text())["latents"]
    batch = task.first_batch(str(latents), 4)
    assert batch["img"].shape == batch["img_std"].shape == (4, 4, 8, 8) and len(batch["txt"]) == 4

    scale, shift = section["scaling_factor"], section["shift_factor"]
    generator = torch.Generator().manual_seed(5)
    eps = torch.randn(batch["img"].shape, generator=generator)
    expected = (batch["img"] + batch["img_std"] * eps - shift) * scale
    drawn = task.latents.x0(batch, torch.Generator().manual_seed(5), torch.device("cpu"))
    assert torch.allclose(drawn, expected, atol=1e-6)
    (x_t, t, _, _), target = task.inputs_and_target(batch, torch.Generator().manual_seed(5))
    assert torch.allclose(x_t - t[:, None, None, None] * target, drawn, atol=1e-5)  # x_t = x0 + t·(noise - x0)

    means = latent_task(digits_dir, latents, tmp_path / "run2", **{"flow.latents": "mean"})
    assert torch.allclose(means.latents.x0(batch, generator, torch.device("cpu")), (batch["img"] - shift) * scale)
    metrics = task.evaluate(task.build_model(), 0)
    assert np.isfinite(metrics["val/loss"])
    images = task.generate(task.build_model(), ["a handwritten digit one"], 2, 2, 3.0, "euler", 0)
    assert images.shape == (2, 1, 32, 32) and images.abs().max() <= 1


@pytest.mark.parametrize("overrides, message", [
    ({"model.in_channels": 3}, r"model.in_channels: is 3, but the latents of .*manifest.json are 4x8x8; set model.in_channels=4"),
    ({"model.out_channels": 16}, r"model.out_channels: is 16, .* set model.out_channels=4"),
    ({"model.sample_size": 32}, r"model.sample_size: is 32, .* set model.sample_size=8"),
    ({"flow.latents": "mode"}, r"flow.latents: unknown value 'mode'; choose one of: sample, mean"),
])
def test_latents_that_do_not_fit_the_model_are_refused(digits_dir, latent_digits, tmp_path, overrides, message):
    with pytest.raises(UsageError, match=message):
        latent_task(digits_dir, latent_digits[1], tmp_path / "run", **overrides)


def test_latent_keys_on_pixel_data_and_another_vae_are_refused(digits_dir, latent_digits, tmp_path):
    vae, latents = latent_digits
    for key, value in (("flow.vae", vae), ("flow.image_field", "latent_mean.npy")):
        with pytest.raises(UsageError, match=rf"{key}: .* has no VAE fields .* --vae VAE"):
            latent_task(digits_dir, digits_dir, tmp_path / "run", **{key: value})
    other = random_vae(tmp_path / "other", seed=1)
    with pytest.raises(UsageError, match=r"flow.vae: the VAE .*other .* is not the one that encoded the latents"):
        latent_task(digits_dir, latents, tmp_path / "run", **{"flow.vae": other})
    with pytest.raises(UsageError, match=r"eval.path: .* is not encoded by the VAE of"):
        latent_task(digits_dir, latents, tmp_path / "run", **{"eval.path": digits_dir})
    assert latent_task(digits_dir, latents, tmp_path / "run", **{"flow.vae": vae}).latents is not None


def test_a_latent_run_trains_and_samples_images_through_its_vae(digits_dir, latent_digits, tmp_path, capsys):
    vae, latents = latent_digits
    overrides = {"data.path": latents, **LATENT_MODEL, "trainer.max_steps": 4, "checkpoint.every_steps": 4,
                 "trainer.sample_every_steps": 4}
    flowmill_ok("train", str(TINY_CONFIG), *tiny_overrides(digits_dir, tmp_path / "run", **overrides), cwd=tmp_path)
    run = tmp_path / "run"
    assert json.loads(RunDir(run).latents.read_text())["vae_sha256"] == load_vae(vae).sha256
    grids = sorted(run.rglob("grid-*.png"))
    assert grids and Image.open(grids[-1]).mode == "L"  # log_samples decodes through the VAE

    out = tmp_path / "out"
    code = main(["sample", str(run), "--prompt", "a handwritten digit two", "--prompt", "a handwritten digit five",
                 "--num-samples", "2", "--steps", "2", "--out", str(out)])
    assert code == 0, capsys.readouterr().err[-3000:]
    records = read_jsonl(out / "samples.jsonl")
    assert [record["prompt"] for record in records] == ["a handwritten digit two"] * 2 + ["a handwritten digit five"] * 2
    assert all(Image.open(out / record["file"]).size == (32, 32) for record in records) and (out / "grid.png").is_file()

    # The VAE the manifest names changed: sampling is refused, naming the key.
    shutil.rmtree(vae.parent / "moved", ignore_errors=True)
    shutil.copytree(vae, vae.parent / "moved")
    random_vae(vae, seed=2)
    try:
        assert main(["sample", str(run), "--prompt", "x", "--out", str(tmp_path / "refused")]) == 2
        assert "data.path: the VAE" in capsys.readouterr().err
    finally:
        shutil.rmtree(vae)
        shutil.move(vae.parent / "moved", vae)
