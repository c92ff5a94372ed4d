"""The autoencoder task end to end through the CLI: training with PSNR/KL metrics and reconstruction grids,
`flowmill reconstruct` and `load_vae` on the run (EMA weights), ZeRO 1-3 on 2 processes with an exact resume,
and the settings refused before training."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowmill.cli import main
from flowmill.errors import UsageError
from flowmill.models.loading import load_vae
from flowmill.run_dir import RunDir
from flowmill.train.config import load_config
from flowmill.train.tasks.autoencoder import comparison_grid
from flowmill.weights import read_ema
from tests.helpers import REPO, flowmill_ok, read_jsonl, rewound_copy

pytestmark = pytest.mark.slow

VAE_TINY = REPO / "configs" / "vae_tiny.yaml"


def vae_overrides(digits: Path, run_dir: Path, **extra) -> list[str]:
    values = {"data.path": digits, "run.dir": run_dir, **extra}
    return [f"{key}={value}" for key, value in values.items()]


@pytest.fixture(scope="module")
def vae_run(digits_dir, tmp_path_factory) -> Path:
    """A finished 8-step single-process run, evaluated at steps 4 and 8, sampled at 8 (read-only)."""
    root = tmp_path_factory.mktemp("vae")
    flowmill_ok("train", str(VAE_TINY), *vae_overrides(digits_dir, root / "run", **{"trainer.eval_every_steps": 4}),
                cwd=root)
    return root / "run"


def test_training_lowers_the_loss_and_logs_psnr_kl_and_grids(vae_run):
    records = {r["step"]: r for r in read_jsonl(vae_run / "logs" / "metrics.jsonl")}
    assert sorted(records) == list(range(1, 9))
    losses = [records[step]["train/loss"] for step in range(1, 9)]
    assert all(math.isfinite(loss) for loss in losses)
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    for step in (4, 8):
        assert 5 < records[step]["val/psnr"] < 60 and records[step]["val/rec_loss"] > 0 and records[step]["val/kl"] > 0
    assert records[8]["val/psnr"] > records[4]["val/psnr"]
    grid = Image.open(vae_run / "samples" / "recon-00000008.png")
    # sample.num_per_prompt=4 digits above their reconstructions: 2 rows of 4 tiles of 32 px + 2 px borders, ×2.
    assert grid.size == ((4 * 34 + 2) * 2, (2 * 34 + 2) * 2)


def test_load_vae_returns_the_runs_ema_autoencoder(vae_run):
    space = load_vae(vae_run)
    assert space.latent_channels == 4 and space.downsample == 2 and space.scaling_factor is None
    ema = read_ema(RunDir.open(vae_run)[1])
    weights = space.vae.state_dict()
    assert set(ema) == {f"vae.{name}" for name in weights}
    assert all(torch.equal(weights[name], ema[f"vae.{name}"]) for name in weights)
    assert load_vae(vae_run / "checkpoints" / "step-00000004").sha256 != space.sha256


def reconstruct(capsys: pytest.CaptureFixture, *args) -> tuple[int, str, str]:
    """`flowmill reconstruct ARGS` in this process: (exit code, stdout, stderr)."""
    code = main(["reconstruct", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_reconstruct_writes_held_out_reconstructions_and_their_psnr(vae_run, digits_dir, tmp_path, capsys):
    out = tmp_path / "recon"
    code, stdout, stderr = reconstruct(capsys, vae_run, "--out", out)
    assert code == 0, stderr[-3000:]
    rows = read_jsonl(out / "reconstructions.jsonl")
    assert [row["file"] for row in rows] == [f"{index:05d}.png" for index in range(8)]  # eval.num_samples of data.path
    final = read_jsonl(vae_run / "logs" / "metrics.jsonl")[-1]["val/psnr"]
    assert np.mean([row["psnr"] for row in rows]) == pytest.approx(final, abs=1e-6)  # the evaluation's images and figure
    assert f"PSNR {final:.2f} dB" in stdout
    assert np.asarray(Image.open(out / "00003.png")).shape == (32, 32)
    assert Image.open(out / "grid.png").size == ((8 * 34 + 2) * 2, (2 * 34 + 2) * 2)

    # Image files of the model's size, and what is refused before any work.
    digit = Image.open(out / "00001.png")
    digit.save(tmp_path / "seven.png")
    code, stdout, stderr = reconstruct(capsys, vae_run, tmp_path / "seven.png", "--out", tmp_path / "files")
    assert code == 0, stderr[-3000:]
    assert (tmp_path / "files" / "seven.png").is_file() and "1 input image(s)" in stdout
    digit.resize((16, 16)).save(tmp_path / "small.png")
    (tmp_path / "notes.png").write_text("not an image")
    for args, message in [
        ((tmp_path / "small.png",), "small.png: image is 16×16 px; the autoencoder was trained on 32×32"),
        ((tmp_path / "notes.png",), "notes.png: not a readable image"),
        ((tmp_path / "missing.png",), "missing.png: no such file"),
        (("--num-tokens", "2"), "--num-tokens, --fit: only a video tokenizer run takes them"),
        (("--num-samples", "0"), "--num-samples: must be at least 1"),
        (("--data", tmp_path / "nowhere"), "--data: cannot read images from"),
    ]:
        code, _, stderr = reconstruct(capsys, vae_run, *args, "--out", tmp_path / "x")
        errors = [line for line in stderr.splitlines() if line.startswith("flowmill: error:")]
        assert code == 2 and len(errors) == 1 and message in errors[0], stderr
    assert not (tmp_path / "x").exists()


def test_sample_points_to_reconstruct(vae_run, tmp_path, capsys):
    code = main(["sample", str(vae_run), "--out", str(tmp_path / "s")])
    _, stderr = capsys.readouterr()
    assert code == 2 and f"use `flowmill reconstruct {vae_run} --out DIR`" in stderr


def test_comparison_grid_puts_each_row_of_originals_above_its_reconstructions():
    originals, reconstructions = -torch.ones(5, 1, 2, 2), torch.ones(5, 1, 2, 2)
    pixels = np.asarray(comparison_grid(originals, reconstructions, cols=3))[::2, ::2]  # undo the ×2 upscale
    tiles = [[pixels[2 + row * 4, 2 + col * 4] for col in range(3)] for row in range(4)]
    assert tiles == [[0, 0, 0], [255, 255, 255], [0, 0, 255], [255, 255, 255]]  # the 6th tile of each pair of rows is blank


@pytest.mark.parametrize("overrides, message", [
    ({"model.out_channels": 3}, "model.out_channels: an autoencoder reconstructs its input"),
    ({"model.in_channels": 4, "model.out_channels": 4}, "model.in_channels: images are grey (1) or RGB (3), got 4"),
    ({"model.norm_num_groups": 3}, "model.norm_num_groups: 3 groups do not divide block_out_channels [8, 16]"),
    ({"model.sample_size": 33}, "model.sample_size: 33 px is not a multiple of the autoencoder's downsampling 2"),
    ({"model.size": "huge"}, "model.size: unknown size 'huge'; choose one of: tiny, sd3"),
    ({"vae.reconstruction": "lpips"}, "vae.reconstruction: 'lpips' is not one of l1, mse"),
    ({"vae.kl_weight": -1.0}, "vae.kl_weight: must be >= 0"),
    ({"vae.image_field": "latent.npy"}, "vae.image_field: an autoencoder learns from images"),
    ({"parallel.pipeline_stages": 2}, "parallel.pipeline_stages: the autoencoder trains without pipeline stages"),
    ({"parallel.activation_checkpointing": True}, "parallel.activation_checkpointing: the autoencoder has no"),
    ({"sample.prompts": "[a digit]"}, "sample.prompts: an autoencoder reconstructs images and takes no prompts"),
])
def test_settings_it_cannot_train_with_are_refused(overrides, message):
    with pytest.raises(UsageError) as error:
        load_config(VAE_TINY, [f"{key}={value}" for key, value in overrides.items()])
    assert message in str(error.value)


# ZeRO-1 here (stage 2 adds only gradient partitioning, DeepSpeed's own, tested for the MMDiT); ZeRO-3 in the resume test.
@pytest.mark.parametrize("stage", [1])
def test_zero_stage_trains_on_two_processes(digits_dir, tmp_path, stage):
    run_dir = tmp_path / "run"
    flowmill_ok("launch", "local", "--nproc", "2", str(VAE_TINY), *vae_overrides(
        digits_dir, run_dir, **{"parallel.zero_stage": stage, "trainer.max_steps": 3, "checkpoint.every_steps": 3}),
        cwd=tmp_path)
    rows = read_jsonl(run_dir / "logs" / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert all(math.isfinite(row["train/loss"]) and math.isfinite(row["train/grad_norm"]) for row in rows)
    assert math.isfinite(rows[-1]["val/psnr"])
    assert len(list((run_dir / "checkpoints" / "step-00000003").glob("*optim_states.pt"))) == 2


def test_resume_under_zero3_on_two_processes_is_exact(digits_dir, tmp_path):
    """6 steps straight vs resumed from its checkpoint of step 4, both ZeRO-3 on 2 gloo processes: the same
    losses and evaluation (the reparameterisation noise and the data order continue where they were)."""
    common = {"parallel.zero_stage": 3, "trainer.max_steps": 6, "optim.decay_steps": 6, "checkpoint.every_steps": 2,
              "trainer.eval_every_steps": 2}
    flowmill_ok("launch", "local", "--nproc", "2", str(VAE_TINY),
                *vae_overrides(digits_dir, tmp_path / "straight", **common), cwd=tmp_path)
    flowmill_ok("resume", str(rewound_copy(tmp_path / "straight", 4, tmp_path / "stopped")), cwd=tmp_path)
    straight = read_jsonl(tmp_path / "straight" / "logs" / "metrics.jsonl")
    resumed = read_jsonl(tmp_path / "stopped" / "logs" / "metrics.jsonl")
    assert [r["train/loss"] for r in resumed] == [r["train/loss"] for r in straight] and len(straight) == 6
    assert resumed[-1]["val/psnr"] == straight[-1]["val/psnr"]
    assert load_vae(tmp_path / "stopped").sha256 == load_vae(tmp_path / "straight").sha256
