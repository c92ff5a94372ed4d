"""A real embedded MLflow store with three runs, shared by the tests of flowmill.runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from flowmill.cli import main
from flowmill.train.tracking_store import default_tracking_uri, sqlite_artifact_location

START_MS = 1_767_225_600_000  # 2026-01-01 00:00 UTC


def loss_history(final: float, steps: int = 5) -> list[tuple[int, float]]:
    """A decreasing loss that bottoms out one step before the end and rises to ``final``."""
    return [(step, final + 0.1 * (steps - 1 - step) if step < steps - 1 else final - 0.05) for step in range(1, steps)] + [
        (steps, final)
    ]


def log_run(client: MlflowClient, experiment_id: str, name: str, lr: str, final_loss: float, duration_s: int, **tags) -> str:
    run = client.create_run(experiment_id, start_time=START_MS, run_name=name, tags=tags)
    params = [Param("optim.lr", lr), Param("model.depth", "2"), Param("run.name", name), Param("trainer.max_steps", "5")]
    metrics = [Metric("train/loss", value, START_MS + step, step) for step, value in loss_history(final_loss)]
    metrics += [Metric("train/lr", float(lr), START_MS + step, step) for step in range(1, 6)]
    metrics += [Metric("train/samples_per_s", 100.0 + step, START_MS + step, step) for step in range(1, 6)]
    metrics += [Metric("system/cpu_utilization_percentage", 50.0, START_MS, 0)]
    client.log_batch(run.info.run_id, metrics=metrics, params=params)
    client.set_terminated(run.info.run_id, "FINISHED", end_time=START_MS + duration_s * 1000)
    return run.info.run_id


def make_store(root: Path) -> dict:
    """A runs root with one SQLite store: experiment "digits" with runs a (run dir, SLURM job) and b (resumed), "other" with c."""
    uri = default_tracking_uri(root)
    client = MlflowClient(uri)
    digits = client.create_experiment("digits", artifact_location=sqlite_artifact_location(uri))
    other = client.create_experiment("other", artifact_location=sqlite_artifact_location(uri))
    run_dir = root / "digits-a"
    run_dir.mkdir()
    a = log_run(client, digits, "digits", "0.001", 0.5, 125, **{"flowmill.run_dir": str(run_dir)})
    b = log_run(client, digits, "digits", "0.0003", 0.75, 3700, **{"flowmill.slurm_job_id": "4242"})
    client.log_batch(b, tags=[RunTag("resume.changed_param.trainer.max_steps", "40")])
    c = log_run(client, other, "other", "0.001", 0.25, 5)
    (run_dir / "run.json").write_text(
        json.dumps({"tracking_uri": uri, "experiment_id": digits, "run_id": a, "status": "preempted", "slurm_job_id": 77})
    )
    return {"root": root, "uri": uri, "a": a, "b": b, "c": c, "run_dir": run_dir}


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err
