"""Resuming on another world size (2 → 1 → 2) through DeepSpeed's universal checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from flowmill.run_dir import Checkpoint
from flowmill.train.distributed import free_port
from flowmill.weights import read_ema
from tests.helpers import TINY_CONFIG, flowmill, tiny_overrides

pytestmark = pytest.mark.slow

# Restores RUN_DIR exactly as `flowmill resume --nproc 1` does, then dumps the ZeRO state it holds.
DUMP = """
import sys, torch
from flowmill.run_dir import RunDir
from flowmill.train import job
from flowmill.train.config import load_config
from flowmill.train.distributed import init_distributed, shutdown
run_dir = RunDir(sys.argv[1])
cfg = load_config(None, [], base=run_dir.saved_config())
env = init_distributed(cfg.trainer.device)
restored, step = job.build_job(cfg, job.make_plan(cfg, env, run_dir, resume=True), env, {})
optimizer = restored.engine.optimizer
flat = optimizer.single_partition_of_fp32_groups[0]
state = optimizer.optimizer.state[flat]
torch.save({"step": step, "fp32": flat.detach().clone(), "exp_avg": state["exp_avg"].clone(),
            "exp_avg_sq": state["exp_avg_sq"].clone(), "numel": sum(p.numel() for p in restored.model.parameters()),
            "micro": restored.plan.micro_batch_size, "accum": restored.plan.grad_accum_steps,
            "ema": restored.ema.whole()}, sys.argv[2])
restored.tracker.finish("KILLED")
shutdown()
"""


# Restores RUN_DIR's latest checkpoint on this process's world size and dumps the EMA it holds, put together.
EMA_DUMP = """
import sys, torch
from flowmill.run_dir import RunDir
from flowmill.train import job
from flowmill.train.config import load_config
from flowmill.train.distributed import init_distributed, shutdown
run_dir = RunDir(sys.argv[1])
cfg = load_config(None, [], base=run_dir.saved_config())
env = init_distributed(cfg.trainer.device)
restored, step = job.build_job(cfg, job.make_plan(cfg, env, run_dir, resume=True), env, {})
whole = restored.ema.whole()
if env.is_main:
    torch.save({"step": step, "ema": whole}, sys.argv[2])
restored.tracker.finish("KILLED")
shutdown()
"""


def restore_on_two_processes(run_dir, dump):
    port = str(free_port())
    workers = [subprocess.Popen([sys.executable, "-c", EMA_DUMP, str(run_dir), str(dump)], stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                                     "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}) for rank in (0, 1)]
    for worker in workers:
        _, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err[-3000:]
    return torch.load(dump)


def equal_weights(ours, theirs):
    return ours.keys() == theirs.keys() and all(torch.equal(ours[name], theirs[name]) for name in ours)


def saved_partitions(step_dir):
    """fp32 weights and Adam moments of a 2-rank ZeRO-2 checkpoint, concatenated in rank order."""
    ranks = [torch.load(step_dir / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", weights_only=False)["optimizer_state_dict"] for r in (0, 1)]
    return {
        "fp32": torch.cat([r["single_partition_of_fp32_groups"][0] for r in ranks]),
        "exp_avg": torch.cat([r["base_optimizer_state"]["state"][0]["exp_avg"] for r in ranks]),
        "exp_avg_sq": torch.cat([r["base_optimizer_state"]["state"][0]["exp_avg_sq"] for r in ranks]),
    }


def steps(run_dir):
    return [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]


def keys_by_step(run_dir, ranks):
    by_step: dict[int, list[str]] = {}
    for rank in ranks:
        path = run_dir / "logs" / f"keys-rank-{rank}.jsonl"
        for line in path.read_text().splitlines():
            record = json.loads(line)
            by_step.setdefault(record["step"], []).extend(record["keys"])
    return by_step


def test_two_to_one_and_back(digits_dir, tmp_path):
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(
        digits_dir, run_dir,
        **{"parallel.zero_stage": 2, "trainer.max_steps": 4, "optim.decay_steps": 8, "checkpoint.every_steps": 4,
           "data.log_keys": "true", "data.num_workers": 1},
    )
    result = flowmill("launch", "local", "--nproc", "2", str(TINY_CONFIG), *overrides, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = keys_by_step(run_dir, ranks=(0, 1))

    # 2 → 1: the restored fp32 weights and Adam moments equal the saved partitions exactly.
    dump = tmp_path / "restored.pt"
    done = subprocess.run([sys.executable, "-c", DUMP, str(run_dir), str(dump)], capture_output=True, text=True,
                          env={**os.environ, "WORLD_SIZE": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    restored = torch.load(dump)
    saved = saved_partitions(run_dir / "checkpoints" / "step-00000004")
    numel = restored["numel"]
    assert restored["step"] == 4
    for name in ("fp32", "exp_avg", "exp_avg_sq"):
        assert torch.equal(restored[name][:numel], saved[name][:numel]), name
    # The global batch (8 per rank x 2 ranks) is kept by accumulating 2 micro-batches of 8.
    assert (restored["micro"], restored["accum"]) == (8, 2)
    # The two EMA shards, re-cut for one rank, are the saved EMA bit for bit.
    assert equal_weights(restored["ema"], read_ema(Checkpoint(run_dir / "checkpoints" / "step-00000004")))

    result = flowmill("resume", str(run_dir), "--nproc", "1", "trainer.max_steps=6", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = steps(run_dir)
    assert [row["step"] for row in rows] == list(range(1, 7))
    assert abs(rows[4]["train/loss"] - rows[3]["train/loss"]) < 0.25 * rows[3]["train/loss"]
    after = keys_by_step(run_dir, ranks=(0,))
    for step in (5, 6):
        assert len(after[step]) == 16, "global batch changed"
    earlier = {key for step in range(1, 5) for key in seen[step]}
    assert not earlier & {key for step in (5, 6) for key in after[step]}, "samples of this epoch repeated"

    # 1 → 2 again: the one shard, re-cut for two ranks, is the saved EMA bit for bit.
    on_two = restore_on_two_processes(run_dir, tmp_path / "on-two.pt")
    assert on_two["step"] == 6
    assert equal_weights(on_two["ema"], read_ema(Checkpoint(run_dir / "checkpoints" / "step-00000006")))
    result = flowmill("resume", str(run_dir), "--nproc", "2", "trainer.max_steps=8", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = steps(run_dir)
    assert [row["step"] for row in rows] == list(range(1, 9))
    final = keys_by_step(run_dir, ranks=(0, 1))
    earlier |= {key for step in (5, 6) for key in after[step]}
    for step in (7, 8):
        assert len(final[step]) == 16
    assert not earlier & {key for step in (7, 8) for key in final[step]}, "samples of this epoch repeated"


def test_without_zero_partitions_the_checkpoint_loads_on_another_world_size(digits_dir, tmp_path):
    """ZeRO stage 0 saves the whole optimizer on every rank: 2 → 1 needs no universal conversion."""
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(digits_dir, run_dir, **{"parallel.zero_stage": 0, "trainer.max_steps": 4,
                                                       "optim.decay_steps": 8, "checkpoint.every_steps": 4})
    result = flowmill("launch", "local", "--nproc", "2", str(TINY_CONFIG), *overrides, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    result = flowmill("resume", str(run_dir), "--nproc", "1", "trainer.max_steps=6", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = steps(run_dir)
    assert [row["step"] for row in rows] == list(range(1, 7))
    assert abs(rows[4]["train/loss"] - rows[3]["train/loss"]) < 0.25 * rows[3]["train/loss"]
    assert not list((run_dir / "checkpoints").glob("*_universal")), "stage 0 was converted needlessly"
    assert json.loads((run_dir / "checkpoints" / "step-00000006" / "flowmill.json").read_text())["world_size"] == 1
