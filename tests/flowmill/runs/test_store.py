"""flowmill.runs.store on a real embedded MLflow store: metric and run summaries."""

from __future__ import annotations

import math

import pytest
from mlflow import MlflowClient

from flowmill.runs import store as runs
from flowmill.runs.store import MetricSummary
from flowmill.runs.tables import differing_params
from tests.flowmill.runs.store_fixture import START_MS


def test_best_direction_and_metric_summary() -> None:
    assert runs.best_direction("train/loss") == "min"
    assert runs.best_direction("val/loss") == "min"
    assert runs.best_direction("train/samples_per_s") == "max"
    assert runs.best_direction("train/lr") is None
    # Final is the value at the highest step even when that step was not logged last; NaN is never best.
    history = [(1, 2.0), (3, 0.5), (2, math.nan), (4, 1.0), (3, 0.7)]
    assert runs.summarize_metric("train/loss", history) == MetricSummary(1.0, 4, "min", 0.5, 3)
    assert runs.summarize_metric("train/samples_per_s", history) == MetricSummary(1.0, 4, "max", 2.0, 1)
    assert runs.summarize_metric("train/lr", history) == MetricSummary(1.0, 4, None, None, None)
    with pytest.raises(ValueError, match="no points"):
        runs.summarize_metric("train/loss", [])


def test_load_runs_by_run_dir_and_by_id(store: dict) -> None:
    a, b = runs.load_runs([str(store["run_dir"]), store["b"], store["b"]], store["uri"])
    assert [a.run_id, b.run_id] == [store["a"], store["b"]]
    # The run dir's run.json wins over MLflow for status and SLURM job id; without one, MLflow and tags speak.
    assert (a.name, a.status, a.slurm_job_id, a.run_dir) == ("digits-a", "preempted", "77", store["run_dir"].resolve())
    assert (b.name, b.status, b.slurm_job_id, b.run_dir) == ("digits", "finished", "4242", None)
    assert a.experiment == b.experiment == "digits"
    assert (a.duration_s(), b.duration_s()) == (125.0, 3700.0)
    assert b.params["trainer.max_steps"] == "5 → 40"
    assert set(a.metrics) == {"train/loss", "train/lr", "train/samples_per_s"}  # system/* is left out
    assert a.metrics["train/loss"] == MetricSummary(0.5, 5, "min", 0.45, 4)
    assert b.metrics["train/loss"] == MetricSummary(0.75, 5, "min", 0.7, 4)
    assert a.metrics["train/samples_per_s"].best == 105.0
    assert differing_params([a, b]) == ["optim.lr", "trainer.max_steps"]
    assert differing_params([a]) == []
    only_loss = runs.load_runs([store["a"]], store["uri"], metrics=["train/loss", "system/cpu_utilization_percentage"])
    assert set(only_loss[0].metrics) == {"train/loss", "system/cpu_utilization_percentage"}


def test_running_run_duration_counts_to_now(store: dict) -> None:
    client = MlflowClient(store["uri"])
    run = client.create_run(client.get_experiment_by_name("other").experiment_id, start_time=START_MS)
    try:
        [summary] = runs.load_runs([run.info.run_id], store["uri"])
        assert (summary.status, summary.end_ms) == ("running", None)
        assert summary.duration_s(now_ms=START_MS + 61_000) == 61.0
    finally:
        client.delete_run(run.info.run_id)
