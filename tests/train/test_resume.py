"""Resume is exact: 20 steps in one go equal 10 steps + `flowmill resume` to 20 (2 processes).

The stopped run reads its shards from an S3 server (moto's, on 127.0.0.1), the uninterrupted one
from local files: remote reading, and resuming from it, gives the local run's losses and order."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from flowmill.run_dir import Checkpoint
from flowmill.weights import read_ema
from tests.helpers import TINY_CONFIG, flowmill, tiny_overrides
from tests.remote_helpers import BUCKET, STORE_GROUP

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group(STORE_GROUP)]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def losses(run_dir: Path) -> dict[int, float]:
    records = read_jsonl(run_dir / "logs" / "metrics.jsonl")
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"duplicated or unordered steps in metrics.jsonl: {steps}"
    return {r["step"]: r["train/loss"] for r in records}


def keys(run_dir: Path, rank: int) -> list[list[str]]:
    return [r["keys"] for r in read_jsonl(run_dir / "logs" / f"keys-rank-{rank}.jsonl")]


def test_resume_continues_exactly(digits_dir, s3_digits, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    # decay_steps pins the LR curve to 20 steps in both runs: with the default (max_steps) the
    # 10-step run would decay over 10 steps and be a different run from its first step.
    common = {
        "trainer.max_steps": 20, "optim.decay_steps": 20, "checkpoint.every_steps": 10,
        "data.log_keys": "true", "data.num_workers": 2,
    }
    done = flowmill("launch", "local", "--nproc", "2", str(TINY_CONFIG), *tiny_overrides(digits_dir, full, **common), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    remote = {"trainer.max_steps": 10, "data.path": f"s3://{BUCKET}/digits/"}  # endpoint and keys: s3_digits.env
    first = flowmill(
        "launch", "local", "--nproc", "2", str(TINY_CONFIG),
        *tiny_overrides(digits_dir, part, **{**common, **remote}), cwd=tmp_path, env=s3_digits.env,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    run_id = json.loads((part / "run.json").read_text())["run_id"]
    assert (part / "latest").read_text().strip() == "checkpoints/step-00000010"

    resumed = flowmill("resume", str(part), "trainer.max_steps=20", cwd=tmp_path, env=s3_digits.env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected, got = losses(full), losses(part)
    rows = [json.loads(line) for line in (part / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(row["train/grad_norm"]) and row["train/grad_norm"] > 0 for row in rows)
    assert sorted(got) == list(range(1, 21))
    for step in range(1, 21):
        assert abs(got[step] - expected[step]) <= 1e-6, (step, got[step], expected[step])
    # The sharded EMA continues exactly too.
    final = "checkpoints/step-00000020"
    ema_full, ema_part = read_ema(Checkpoint(full / final)), read_ema(Checkpoint(part / final))
    assert ema_full.keys() == ema_part.keys()
    for name, tensor in ema_full.items():
        torch.testing.assert_close(ema_part[name], tensor, rtol=0, atol=1e-6, msg=name)
    # The data stream continues at the exact next sample on every rank.
    for rank in (0, 1):
        assert keys(part, rank) == keys(full, rank)
        assert len(keys(part, rank)) == 20

    info = json.loads((part / "run.json").read_text())
    assert info["run_id"] == run_id and info["status"] == "finished" and info["world_size"] == 2
    from mlflow.tracking import MlflowClient

    client = MlflowClient(info["tracking_uri"])
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 21)), "MLflow steps duplicated or missing"
    assert client.get_run(run_id).info.status == "FINISHED"
