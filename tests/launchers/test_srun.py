"""A plain `srun` of `flowmill train`: every task finds its place in the step, one job, one MLflow run."""

from __future__ import annotations

import subprocess
import sys

from mlflow import MlflowClient

from tests.launchers.cluster import JOB_TIMEOUT_S, on_cluster, run_json, tiny


@on_cluster
def test_plain_srun_of_two_tasks_on_two_nodes_is_one_job_with_one_mlflow_run(digits_dir, tmp_path):
    run_dir = tmp_path / "run"
    done = subprocess.run(
        ["srun", "-N", "2", "-n", "2", "-p", "debug", "--chdir", str(tmp_path), sys.executable, "-m", "flowmill.cli",
         "train", *tiny(run_dir, digits_dir, **{"trainer.max_steps": 6, "trainer.log_every_steps": 2})],
        capture_output=True, text=True, timeout=JOB_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    info = run_json(run_dir)
    assert (info["world_size"], info["status"], info["step"]) == (2, "finished", 6)
    client = MlflowClient(info["tracking_uri"])
    assert len(client.search_runs([info["experiment_id"]])) == 1
    steps = [metric.step for metric in client.get_metric_history(info["run_id"], "train/loss")]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    # stderr went to a pipe, as it goes to a file under SLURM: plain progress lines, no carriage returns
    assert "\r" not in done.stderr
    assert [line.split(" loss ")[0] for line in done.stderr.splitlines() if " step " in line and "/6 loss" in line] == [
        "[flowmill rank 0] step 2/6", "[flowmill rank 0] step 4/6", "[flowmill rank 0] step 6/6"]
