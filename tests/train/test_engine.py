"""The DeepSpeed engine flowmill builds: its config, and the work it leaves out when alone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from flowmill.run_dir import RunDir
from flowmill.train.config import Config, ParallelConfig, TrainerConfig
from flowmill.train.engine import REDUCE_BUCKET_BYTES, deepspeed_config
from flowmill.train.plan import Plan

# Alone on ZeRO 0, the engine skips DeepSpeed's all-reduce of the gradients: three steps must
# give the same weights, bit for bit, as an engine that runs it.
ALONE = """
import copy, sys, torch, torch.nn.functional as F
from flowmill.models.mmdit import MMDiT, mmdit_config
from flowmill.run_dir import RunDir
from flowmill.train.config import Config, TrainerConfig
from flowmill.train.distributed import init_distributed, shutdown
from flowmill.train.engine import autocast_dtype, build_engine
from flowmill.train.plan import Plan
env = init_distributed("cpu")
torch.manual_seed(0)
config = mmdit_config("tiny")
model = MMDiT(config)
cfg = Config(trainer=TrainerConfig(micro_batch_size=2, precision=sys.argv[1]))
plan = Plan.of(cfg, RunDir("unused"), world_size=1, resume=False)
dtype = autocast_dtype(cfg)
skipping, reducing = build_engine(copy.deepcopy(model), cfg, plan), build_engine(copy.deepcopy(model), cfg, plan)
assert not skipping.enable_backward_allreduce
assert getattr(skipping.optimizer, "optimizer", skipping.optimizer).defaults["fused"]  # bf16 wraps the AdamW
reducing.enable_backward_allreduce = True  # DeepSpeed's own path
generator = torch.Generator().manual_seed(1)
side = config.sample_size
for step in range(3):
    inputs = (torch.randn(2, config.in_channels, side, side, generator=generator), torch.rand(2, generator=generator),
              torch.randn(2, 4, config.txt_dim, generator=generator), torch.randn(2, config.vec_dim, generator=generator))
    target = torch.randn(2, config.in_channels, side, side, generator=generator)
    for engine in (skipping, reducing):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            velocity = engine(*(tensor.to(dtype) for tensor in inputs))
        engine.backward(F.mse_loss(velocity.float(), target))
        engine.step()
for mine, theirs in zip(skipping.module.parameters(), reducing.module.parameters(), strict=True):
    assert torch.equal(mine, theirs)
assert any((p != q.to(p.dtype)).any() for p, q in zip(skipping.module.parameters(), model.parameters())), "no step taken"
shutdown()
print("same")
"""


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_zero_reduce_bucket_holds_the_largest_gradient_up_to_ddps_25_mb(stage, precision):
    cfg = Config(parallel=ParallelConfig(zero_stage=stage), trainer=TrainerConfig(precision=precision))
    plan = Plan.of(cfg, RunDir("unused"), world_size=2, resume=False)
    itemsize = 2 if precision == "bf16" else 4

    def bucket(largest_param):
        return deepspeed_config(cfg, plan, largest_param=largest_param)["zero_optimization"]["reduce_bucket_size"]

    assert bucket(768 * 3072) == 768 * 3072
    assert bucket(10**9) * itemsize == bucket(None) * itemsize == REDUCE_BUCKET_BYTES == 25 * 2**20


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_alone_the_engine_skips_the_all_reduce_and_steps_the_same(precision):
    done = subprocess.run([sys.executable, "-c", ALONE, precision], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "WORLD_SIZE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("same")
