"""`flowmill launch slurm` and `flowmill runs logs` on the local SLURM cluster (`make slurm-up`).

The fresh training jobs (a 2-node run that gets preempted, a sweep of two, a job that crashes)
are submitted together by one module fixture, so that they queue and run side by side; each
test then waits for its own job. The preemption test comes first: it must signal its job
mid-run. The preempted run is then extended by hand on one node with two tasks. Refusals run
in-process and check that no submitit folder appeared, i.e. nothing was submitted.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from flowmill.cli import main
from tests.helpers import TINY_CONFIG, tiny_overrides

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.xdist_group("slurm")]  # one worker: one cluster

JOB_TIMEOUT_S = 600  # submit → end of one job; a quiet machine needs ~30-60 s, a loaded one several times that
END_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}
PREEMPT_STEPS = 30  # long enough that the signal lands mid-run

if shutil.which("sbatch") is None:
    pytest.skip("SLURM is not installed (no sbatch); run `make slurm-up`", allow_module_level=True)


def launch(*argv: str) -> tuple[int, str]:
    """``flowmill launch slurm ARGV`` in this process: (exit code, stdout). stderr stays on fd 2 (capfd)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["launch", "slurm", *argv])
    return code, out.getvalue()


def submit(*argv: str) -> str:
    """Submit and return the job id that the launcher printed."""
    code, out = launch(*argv)
    assert code == 0, out
    return re.search(r"submitted SLURM job (?:array )?(\d+)", out).group(1)


def tiny(run_dir: Path, digits_dir: Path, **extra) -> list[str]:
    return [str(TINY_CONFIG), *tiny_overrides(digits_dir, run_dir, **{"checkpoint.every_steps": 100, **extra})]


def sacct_states(job_id: str) -> list[str]:
    """The state of every attempt of the job (requeues included), oldest first."""
    done = subprocess.run(["sacct", "-n", "-X", "-D", "-P", "-o", "State", "-j", job_id], capture_output=True, text=True, timeout=60)
    return [line.split()[0] for line in done.stdout.splitlines() if line.strip()]


def wait_for_end(job_id: str) -> list[str]:
    """Wait until the job's last attempt has ended; returns the states of all its attempts."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (states := sacct_states(job_id)) or states[-1] not in END_STATES:
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id.partition("_")[0]], timeout=60)
            pytest.fail(f"job {job_id} not over after {JOB_TIMEOUT_S} s (states {states})")
        time.sleep(2.0)
    return states


def metric_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]


def mlflow_history(run_dir: Path, key: str = "train/loss") -> list[int]:
    """Steps of ``key`` in the run's MLflow run, in logging order."""
    from mlflow import MlflowClient

    info = json.loads((run_dir / "run.json").read_text())
    history = MlflowClient(info["tracking_uri"]).get_metric_history(info["run_id"], key)
    return sorted(point.step for point in history)


def run_json(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


@pytest.fixture(scope="module", autouse=True)
def cluster():
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    if ping.returncode != 0:
        pytest.fail(f"SLURM is installed but slurmctld does not answer ({ping.stdout.strip()}); run `make slurm-up`")


@pytest.fixture(scope="module")
def jobs(digits_dir, tmp_path_factory):
    """Every fresh training job of this module, submitted at once; cancelled at the end if still there."""
    root = tmp_path_factory.mktemp("slurm-launch")
    preempt, crash, sweep_root = root / "preempt" / "run", root / "crash" / "run", root / "sweep"
    submitted = {
        # first, so that it starts first: its test signals it mid-run
        "preempt": submit(*tiny(preempt, digits_dir, **{"trainer.max_steps": PREEMPT_STEPS}),
                          "--partition", "debug", "--nodes", "2", "--tasks-per-node", "1", "--time", "10"),
        "sweep": submit(*tiny(sweep_root, digits_dir, **{"trainer.max_steps": 4}),
                        "--partition", "debug", "--time", "10", "--sweep", "optim.lr=1e-3,3e-4"),
        # no GPU here: every attempt dies in its first seconds
        "crash": submit(*tiny(crash, digits_dir, **{"trainer.device": "cuda"}),
                        "--partition", "debug", "--time", "10", "--max-retries", "1"),
    }
    yield {"ids": submitted, "preempt": preempt, "sweep": sweep_root, "crash": crash}
    for job_id in submitted.values():
        subprocess.run(["scancel", job_id], timeout=60)


def test_preempted_two_node_job_requeues_once_and_finishes(jobs, capfd):
    run_dir, job_id = jobs["preempt"], jobs["ids"]["preempt"]
    metrics = run_dir / "logs" / "metrics.jsonl"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert time.monotonic() < deadline, f"job {job_id} did not reach step 3 (states {sacct_states(job_id)})"
        time.sleep(0.2)
    # The job recorded itself in run.json at its first step; a second job on the same run is refused.
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


def test_crash_is_retried_then_fails_for_good(jobs):
    job_id = jobs["ids"]["crash"]
    assert wait_for_end(job_id) == ["REQUEUED", "FAILED"]
    log = (jobs["crash"].parent / "slurm" / "run" / f"{job_id}_0_log.err").read_text()
    assert log.count("trainer.device=cuda but no CUDA device is visible") >= 2
    assert "requeued (0 retries left)" in log and "no retries left (launcher.slurm.max_retries=1)" in log


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


@pytest.mark.parametrize(
    "flags, overrides, message",
    [
        (["--partition", "nope"], [], "launcher.slurm.partition: 'nope' is not a partition of this cluster; choose one of: debug"),
        (["--nodes", "3"], [], "launcher.slurm.nodes: 3 nodes asked for, partition debug has 2"),
        (["--tasks-per-node", "3"], ["parallel.pipeline_stages=2"], "parallel.pipeline_stages: 2 stages do not divide the world size 3"),
        (["--time", "1"], ["launcher.slurm.signal_delay_s=60"], "launcher.slurm.signal_delay_s"),
        (["--slurm-extra", "nodes=4"], [], "launcher.slurm.extra.nodes: set by flowmill"),
        (["--sweep", "launcher.slurm.nodes=1,2"], [], "--sweep launcher.slurm.nodes"),
        (["--sweep", "optim.lr=1e-3,3e-4"], ["optim.lr=1e-4"], "--sweep optim.lr is also set by the override optim.lr=1e-4"),
    ],
)
def test_refused_before_submission(flags, overrides, message, digits_dir, tmp_path, capfd):
    code, _ = launch(*flags, "--folder", str(tmp_path / "slurm"), *tiny(tmp_path / "run", digits_dir), *overrides)
    err = capfd.readouterr().err
    assert code == 2 and message in err, err
    assert not (tmp_path / "slurm").exists() and not (tmp_path / "run").exists()


def test_no_sbatch_refused(digits_dir, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("PATH", str(tmp_path))
    code, _ = launch(*tiny(tmp_path / "run", digits_dir), "--folder", str(tmp_path / "slurm"))
    err = capfd.readouterr().err
    assert code == 2 and "sbatch is not on PATH" in err, err
    assert not (tmp_path / "slurm").exists()


def test_resume_of_a_folder_that_is_not_a_run_refused(tmp_path, capfd):
    (tmp_path / "notarun").mkdir()
    code, _ = launch("--resume", str(tmp_path / "notarun"), "--folder", str(tmp_path / "slurm"))
    err = capfd.readouterr().err
    assert code == 2 and "is not a flowmill run dir" in err, err
    assert not (tmp_path / "slurm").exists()


def test_folder_inside_a_new_run_dir_refused(digits_dir, tmp_path, capfd):
    code, _ = launch("--folder", str(tmp_path / "run" / "slurm"), *tiny(tmp_path / "run", digits_dir))
    err = capfd.readouterr().err
    assert code == 2 and "launcher.slurm.folder" in err and "inside the run dir" in err, err
    assert not (tmp_path / "run").exists()
