"""The SLURM job of `flowmill launch slurm`: process-group environment, run.json records,
preemption and requeue.

``TrainingJob`` runs first in a subprocess with the environment SLURM and submitit give a task
(``scontrol requeue`` replaced by a recorder). Then the real thing on the local cluster
(`make slurm-up`): the fresh training jobs (a 2-node run that gets preempted, a sweep of two,
a job that crashes) are submitted together by one module fixture, so that they queue and run
side by side; each test then waits for its own job. The preemption test comes first: it must
signal its job mid-run. The preempted run is then extended by hand on one node with two tasks.
"""

from __future__ import annotations

import json
import os
import platform
import random
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flowmill.cli import main
from flowmill.launchers.slurm_job import record_requeue
from flowmill.launchers.slurm_submit import new_run_configs
from flowmill.run_dir import RunDir
from flowmill.train.config import to_dict
from flowmill.train.distributed import MASTER_PORT_SPAN, rendezvous_port
from tests.helpers import TINY_CONFIG, tiny_overrides
from tests.launchers.cluster import JOB_TIMEOUT_S, launch, on_cluster, run_json, sacct_states, submit, tiny, wait_for_end

PREEMPT_STEPS = 30  # long enough that the signal lands mid-run
# The sweep runs in a prepared environment: a setup line standing in for `module load` (which exports
# LOADEDMODULES), and as launcher.slurm.python a script standing in for `apptainer exec IMAGE python`
# (inside, Apptainer names the image in APPTAINER_CONTAINER); srun names the training step.
MODULES, IMAGE, STEP_NAME = "cuda/12.4:nccl/2.21", "/images/flowmill-test.sif", "train-step"

# One task of a job, as submitit starts it; argv: the TrainingJob's config (JSON file), "preempt" or "continue".
TASK = """
import json, sys
from flowmill.launchers import slurm_job
from flowmill.train.preemption import StopRequest

class AskedToStop(StopRequest):
    def __init__(self):
        super().__init__()
        self.request("USR2")

if sys.argv[2] == "preempt":
    slurm_job.StopRequest = AskedToStop
slurm_job.requeue = lambda job_id: print(f"requeued {job_id}", flush=True)
try:
    print(f"outcome {slurm_job.TrainingJob(json.load(open(sys.argv[1])), retries_left=0)()}", flush=True)
except SystemExit as leaving:
    print(f"exit {leaving.code}", flush=True)
"""


def test_record_requeue_keeps_the_rest_of_run_json(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"run_id": "abc", "status": "running", "slurm_folder": "/f"}))
    record_requeue(RunDir(tmp_path), "12_1")
    info = run_json(tmp_path)
    assert (info["run_id"], info["status"], info["slurm_job_id"], info["slurm_folder"]) == ("abc", "preempted", "12_1", "/f")


def free_job_id() -> str:
    """A job id whose rendezvous port is free on this machine."""
    while True:
        job_id = random.randrange(1, MASTER_PORT_SPAN)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", rendezvous_port(str(job_id))))
            except OSError:
                continue
        return str(job_id)


@pytest.mark.slow
def test_task_records_its_job_requeues_when_preempted_and_finishes(digits_dir, tmp_path):
    (cfg,) = new_run_configs(str(TINY_CONFIG), tiny_overrides(digits_dir, tmp_path / "run", **{"trainer.max_steps": 3}), [])
    config = tmp_path / "job.json"
    config.write_text(json.dumps(to_dict(cfg)))
    job_id, folder = free_job_id(), tmp_path / "slurm" / "run"
    env = {
        **os.environ, "SUBMITIT_EXECUTOR": "slurm", "SUBMITIT_FOLDER": str(folder), "SLURM_JOB_ID": job_id,
        "SLURM_NTASKS": "1", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "localhost", "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
    }

    def attempt(mode: str) -> str:
        done = subprocess.run([sys.executable, "-c", TASK, str(config), mode], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    out = attempt("preempt")
    assert f"requeued {job_id}" in out and "exit 0" in out, out
    info = run_json(Path(cfg.run.dir))
    assert (info["status"], info["step"], info["slurm_job_id"], info["slurm_folder"]) == ("preempted", 1, job_id, str(folder))
    out = attempt("continue")
    assert "outcome finished" in out and "requeued" not in out, out
    info = run_json(Path(cfg.run.dir))
    assert (info["status"], info["step"], info["slurm_job_id"], info["slurm_folder"]) == ("finished", 3, job_id, str(folder))


def metric_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]


def mlflow_history(run_dir: Path, key: str = "train/loss") -> list[int]:
    """Steps of ``key`` in the run's MLflow run, in logging order."""
    from mlflow import MlflowClient

    info = json.loads((run_dir / "run.json").read_text())
    history = MlflowClient(info["tracking_uri"]).get_metric_history(info["run_id"], key)
    return sorted(point.step for point in history)


@pytest.fixture(scope="module")
def jobs(digits_dir, tmp_path_factory):
    """Every fresh training job of this module, submitted at once; cancelled at the end if still there."""
    root = tmp_path_factory.mktemp("slurm-launch")
    preempt, crash, sweep_root = root / "preempt" / "run", root / "crash" / "run", root / "sweep"
    container_python = root / "container-python"
    container_python.write_text(f'#!/bin/sh\nexport APPTAINER_CONTAINER={IMAGE}\nexec {shlex.quote(sys.executable)} "$@"\n')
    container_python.chmod(0o755)
    prepared = {"launcher.slurm.setup": json.dumps([f"export LOADEDMODULES={MODULES}"]),
                "launcher.slurm.python": str(container_python),
                "launcher.slurm.srun_args": json.dumps([f"--job-name={STEP_NAME}"])}
    submitted = {
        # first, so that it starts first: its test signals it mid-run
        "preempt": submit(*tiny(preempt, digits_dir, **{"trainer.max_steps": PREEMPT_STEPS}),
                          "--partition", "debug", "--nodes", "2", "--tasks-per-node", "1", "--time", "10"),
        "sweep": submit(*tiny(sweep_root, digits_dir, **{"trainer.max_steps": 4, **prepared}),
                        "--partition", "debug", "--time", "10", "--sweep", "optim.lr=1e-3,3e-4"),
        # no GPU here: every attempt dies in its first seconds
        "crash": submit(*tiny(crash, digits_dir, **{"trainer.device": "cuda"}),
                        "--partition", "debug", "--time", "10", "--max-retries", "1"),
    }
    yield {"ids": submitted, "preempt": preempt, "sweep": sweep_root, "crash": crash}
    for job_id in submitted.values():
        subprocess.run(["scancel", job_id], timeout=60)


@on_cluster
def test_preempted_two_node_job_requeues_once_and_finishes(jobs, capfd):
    run_dir, job_id = jobs["preempt"], jobs["ids"]["preempt"]
    metrics = run_dir / "logs" / "metrics.jsonl"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert time.monotonic() < deadline, f"job {job_id} did not reach step 3 (states {sacct_states(job_id)})"
        time.sleep(0.2)
    # The job recorded itself in run.json when it started the run; a second job on the same run is refused.
    assert run_json(run_dir)["slurm_job_id"] == job_id
    code, _ = launch("--resume", str(run_dir))
    assert code == 2 and f"still in SLURM job {job_id} (RUNNING)" in capfd.readouterr().err
    # What submitit's job._interrupt() sends on preemption.
    subprocess.run(["scancel", "--signal", "SIGTERM", job_id], check=True, timeout=60)
    subprocess.run(["scancel", "--signal", "USR2", job_id], check=True, timeout=60)

    assert wait_for_end(job_id) == ["REQUEUED", "COMPLETED"]
    nodes = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "NodeList", "-j", job_id], capture_output=True, text=True).stdout
    assert nodes.strip() == "n[1-2]"
    info = run_json(run_dir)
    assert (info["status"], info["step"], info["world_size"], info["slurm_job_id"]) == ("finished", PREEMPT_STEPS, 2, job_id)
    saved = sorted(int(path.name.removeprefix("step-")) for path in (run_dir / "checkpoints").iterdir())
    assert len(saved) == 2 and 3 <= saved[0] < PREEMPT_STEPS and saved[1] == PREEMPT_STEPS, saved
    expected = list(range(1, PREEMPT_STEPS + 1))
    assert metric_steps(run_dir) == expected
    assert mlflow_history(run_dir) == expected


@on_cluster
def test_resume_by_hand_as_one_node_of_two_tasks(jobs):
    """The preempted 2-node run, extended by hand on one node with two tasks (same world size)."""
    run_dir, first_job = jobs["preempt"], jobs["ids"]["preempt"]
    wait_for_end(first_job)
    run_id = run_json(run_dir)["run_id"]
    # partition and time come from the run's config.yaml
    job_id = submit("--resume", str(run_dir), "--nodes", "1", "--tasks-per-node", "2", f"trainer.max_steps={PREEMPT_STEPS + 4}")
    assert wait_for_end(job_id) == ["COMPLETED"]
    nodes = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "NodeList", "-j", job_id], capture_output=True, text=True).stdout
    assert nodes.strip() in ("n1", "n2")
    info = run_json(run_dir)
    assert (info["status"], info["step"], info["world_size"], info["run_id"]) == ("finished", PREEMPT_STEPS + 4, 2, run_id)
    assert info["slurm_job_id"] == job_id != first_job
    expected = list(range(1, PREEMPT_STEPS + 5))
    assert metric_steps(run_dir) == expected
    assert mlflow_history(run_dir) == expected


@on_cluster
def test_sweep_of_two_is_one_array_of_two_finished_runs(jobs):
    from mlflow import MlflowClient

    array_id = jobs["ids"]["sweep"]
    for index in (0, 1):
        assert wait_for_end(f"{array_id}_{index}") == ["COMPLETED"]
    run_dirs = sorted(path for path in jobs["sweep"].iterdir() if (path / "run.json").is_file())
    assert len(run_dirs) == 2, run_dirs
    infos = [run_json(run_dir) for run_dir in run_dirs]
    assert [info["status"] for info in infos] == ["finished", "finished"]
    assert sorted(info["slurm_job_id"] for info in infos) == [f"{array_id}_0", f"{array_id}_1"]
    runs = [MlflowClient(info["tracking_uri"]).get_run(info["run_id"]).data for info in infos]
    params = [run.params for run in runs]
    assert len({info["run_id"] for info in infos}) == 2
    assert sorted(float(p["optim.lr"]) for p in params) == [3e-4, 1e-3]
    sweep_id = params[0]["run.sweep_id"]
    assert sweep_id != "None" and params[1]["run.sweep_id"] == sweep_id
    # Tagged too, so the MLflow UI finds a sweep's runs and each run's SLURM job.
    assert [run.tags["flowmill.sweep_id"] for run in runs] == [sweep_id, sweep_id]
    assert sorted(run.tags["flowmill.slurm_job_id"] for run in runs) == [f"{array_id}_0", f"{array_id}_1"]
    assert all(run_dir.name.endswith(f"{sweep_id}-{index}") for index, run_dir in enumerate(run_dirs))


@on_cluster
def test_sweep_runs_report_the_setup_line_and_the_python_command(jobs):
    from mlflow import MlflowClient

    array_id = jobs["ids"]["sweep"]
    for index in (0, 1):
        wait_for_end(f"{array_id}_{index}")
    run_dirs = sorted(path for path in jobs["sweep"].iterdir() if (path / "run.json").is_file())
    assert len(run_dirs) == 2, run_dirs
    python = f"{sys.executable} (Python {platform.python_version()})"
    for run_dir in run_dirs:
        info = run_json(run_dir)
        tags = MlflowClient(info["tracking_uri"]).get_run(info["run_id"]).data.tags
        assert (tags["flowmill.python"], tags["flowmill.container"], tags["flowmill.modules"]) == (python, IMAGE, MODULES)
        log = (run_dir / "logs" / "train.log").read_text()
        assert f"INFO environment: python {python}; container {IMAGE}; modules {MODULES}\n" in log, log
    steps = subprocess.run(["sacct", "-n", "-P", "-o", "JobID,JobName", "-j", array_id], capture_output=True, text=True,
                           timeout=60).stdout.split()
    assert sorted(step for step in steps if step.endswith(f"|{STEP_NAME}")) == [
        f"{array_id}_0.0|{STEP_NAME}", f"{array_id}_1.0|{STEP_NAME}"], steps


@on_cluster
def test_crash_is_retried_then_fails_for_good(jobs):
    job_id = jobs["ids"]["crash"]
    assert wait_for_end(job_id) == ["REQUEUED", "FAILED"]
    log = (jobs["crash"].parent / "slurm" / "run" / f"{job_id}_0_log.err").read_text()
    assert log.count("trainer.device=cuda but no CUDA device is visible") >= 2
    assert "requeued (0 retries left)" in log and "no retries left (launcher.slurm.max_retries=1)" in log


@on_cluster
def test_runs_logs_prints_each_rank(jobs, capfd):
    run_dir = jobs["preempt"]
    wait_for_end(jobs["ids"]["preempt"])
    job_id = run_json(run_dir)["slurm_job_id"]
    assert main(["runs", "logs", str(run_dir), "--rank", "1"]) == 0
    out = capfd.readouterr().out
    assert "global_rank=1(2)" in out and "global_rank=0(2)" not in out
    assert f"{job_id}_1_log.out <==" in out and f"{job_id}_1_log.err <==" in out
    assert main(["runs", "logs", str(run_dir), "--rank", "2"]) == 2
    assert "ranks with logs: 0, 1" in capfd.readouterr().err

