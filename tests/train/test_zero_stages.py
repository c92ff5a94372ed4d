"""ZeRO stages 1-3 and bf16 train on 2 CPU processes (gloo), checkpoint and resume."""

from __future__ import annotations

import json
import math

import pytest

from tests.helpers import TINY_CONFIG, flowmill, tiny_overrides

pytestmark = pytest.mark.slow


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("stage, precision, resume", [(1, "bf16", False), (2, "fp32", False), (3, "fp32", True)])
def test_zero_stage_trains(digits_dir, tmp_path, stage, precision, resume):
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(
        digits_dir, run_dir,
        **{"parallel.zero_stage": stage, "trainer.precision": precision, "trainer.max_steps": 3, "checkpoint.every_steps": 2},
    )
    result = flowmill("launch", "local", "--nproc", "2", str(TINY_CONFIG), *overrides, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    if resume:
        result = flowmill("resume", str(run_dir), "trainer.max_steps=5", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics(run_dir)
    assert [row["step"] for row in rows] == list(range(1, 6 if resume else 4))
    assert all(math.isfinite(row["train/loss"]) and math.isfinite(row["train/grad_norm"]) for row in rows)
    step_dir = run_dir / "checkpoints" / ("step-00000005" if resume else "step-00000003")
    assert (run_dir / "latest").read_text().strip() == f"checkpoints/{step_dir.name}"
    # Every rank wrote its own part of the sharded checkpoint.
    assert sorted(p.name for p in step_dir.glob("rank-*.pt")) == ["rank-00000.pt", "rank-00001.pt"]
    if stage > 0:
        assert len(list(step_dir.glob("*optim_states.pt"))) == 2
