"""The paths only a GPU exercises: CUDA device choice, nccl, bf16 on CUDA, pinned host memory,
EMA shards kept in host memory, the VAE encoding and decoding on the GPU. Skipped where no GPU is visible; run with ``pytest -m gpu``."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from flowmill.data.encode import encode_device
from flowmill.models.loading import load_vae
from flowmill.train.distributed import DistEnv, backend_for, choose_device, placement
from flowmill.train.ema import EMA
from flowmill.train.loop import on_device
from tests.helpers import TINY_CONFIG, flowmill, tiny_overrides
from tests.latent_helpers import encode_digits, random_vae

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")]


def test_auto_picks_the_gpu_and_nccl():
    device = choose_device("auto")
    assert device.type == "cuda" and backend_for(device) == "nccl"


def test_batches_reach_the_gpu_through_pinned_memory():
    batch = {"img": torch.randn(4, 1, 8, 8), "txt": ["a", "b", "c", "d"]}
    (moved,) = list(on_device(iter([batch]), torch.device("cuda", 0)))
    assert moved["img"].device.type == "cuda" and moved["txt"] == batch["txt"]
    torch.testing.assert_close(moved["img"].cpu(), batch["img"])


def test_ema_shards_can_live_in_host_memory():
    live = nn.Linear(4, 4).cuda()
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cuda", 0))
    ema = EMA(live, env, decay=0.5, warmup=False, device=placement("cpu", env.device, "ema.device"))
    with torch.no_grad():
        live.weight.add_(1.0)
    ema.update(live)
    assert all(shard.device.type == "cpu" for shard in ema.shards.values())
    with ema.averaged(live) as averaged:
        assert next(averaged.parameters()).device.type == "cuda"


@pytest.mark.slow
def test_a_bf16_run_on_the_gpu_trains_and_samples(digits_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = flowmill("train", str(TINY_CONFIG), *tiny_overrides(digits_dir, run_dir, **{
        "trainer.device": "cuda", "trainer.precision": "bf16", "ema.device": "cpu", "trainer.max_steps": 4,
        "checkpoint.every_steps": 2}), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    sampled = flowmill("sample", str(run_dir), "--prompt", "a handwritten digit one", "--num-samples", "2",
                       "--steps", "2", "--out", str(tmp_path / "samples"), cwd=tmp_path)
    assert sampled.returncode == 0, sampled.stderr[-3000:]


def test_latent_space_on_the_gpu_matches_the_cpu(tmp_path):
    space = load_vae(random_vae(tmp_path / "vae", scaling_factor=0.5, shift_factor=0.1))
    images = torch.rand(2, 1, 32, 32) * 2 - 1
    on_cpu = space.decode(space.encode(images))
    on_gpu = space.to("cuda").decode(space.encode(images.cuda()))
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-4, rtol=1e-4)


def test_encoding_runs_on_the_gpu(digits_dir, tmp_path):
    assert encode_device(0).type == "cuda"
    manifest = encode_digits(digits_dir, random_vae(tmp_path / "vae"), tmp_path / "latents", processes=1)
    assert manifest["latents"]["shape"] == [4, 8, 8]
