"""The local SLURM cluster of launchers/slurm_cluster/ (`make slurm-up`), driven by submitit.

Needs the cluster running: skipped without it (see tests/launchers/cluster.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit

from tests.launchers.cluster import NEEDS_CLUSTER
from tests.needs import ROOT, skip_reason

# xdist_group: under `make test` (two xdist workers), every SLURM test runs on one worker, one
# after another: they share one two-node cluster.
pytestmark = NEEDS_CLUSTER

UP_SCRIPT = Path(__file__).resolve().parents[2] / "launchers" / "slurm_cluster" / "up.sh"
JOB_TIMEOUT_S = 600  # submit → results: ~5 s on an idle cluster, minutes while other tests' jobs hold the nodes
SACCT_TIMEOUT_S = 30  # accounting lags the queue by ~5 s


def where_am_i() -> tuple[int, int, int, str]:
    """Runs in each task: (global rank, node index, number of tasks, SLURM node name)."""
    env = submitit.JobEnvironment()
    return env.global_rank, env.node, env.num_tasks, os.environ["SLURMD_NODENAME"]


@pytest.fixture(scope="module", autouse=True)
def by_value(slurm_controller):
    """Ships this module to the jobs: they cannot import it, so cloudpickle sends its functions by value."""
    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    yield
    cloudpickle.unregister_pickle_by_value(module)


def submit(folder: Path, **resources) -> submitit.Job:
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(slurm_partition="debug", cpus_per_task=1, timeout_min=10, **resources)
    return executor.submit(where_am_i)


def results_within(job: submitit.Job, timeout_s: float) -> list:
    """Every task's result, or a failure (job cancelled) when the job outlives timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not job.done(force_check=True):
        if time.monotonic() > deadline:
            job.cancel(check=False)
            pytest.fail(f"job {job.job_id} not done after {timeout_s} s (state {job.state})")
        time.sleep(0.5)
    return job.results()


def wait_for_accounted_state(job: submitit.Job, expected: str) -> None:
    deadline = time.monotonic() + SACCT_TIMEOUT_S
    while job.get_info(mode="force").get("State") != expected:
        if time.monotonic() > deadline:
            pytest.fail(f"sacct state of job {job.job_id} is {job.state}, not {expected}, after {SACCT_TIMEOUT_S} s")
        time.sleep(1.0)
    assert job.state == expected


def test_up_is_a_quick_no_op_when_running():
    if os.geteuid() != 0:
        pytest.skip(skip_reason(ROOT, "up.sh starts the daemons as root"))
    before = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True).stdout
    started = time.monotonic()
    run = subprocess.run([str(UP_SCRIPT)], capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - started
    assert run.returncode == 0, run.stderr
    assert elapsed < 10, f"up.sh took {elapsed:.1f} s on a running cluster"
    assert "wrote " not in run.stderr and "installing" not in run.stderr, run.stderr
    after = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True).stdout
    boot_time = next(line for line in before.splitlines() if line.startswith("BOOT_TIME"))
    assert boot_time in after, "up.sh restarted slurmctld"


def test_two_nodes_one_task_each(tmp_path):
    job = submit(tmp_path, nodes=2, tasks_per_node=1)
    assert sorted(results_within(job, JOB_TIMEOUT_S)) == [(0, 0, 2, "n1"), (1, 1, 2, "n2")]
    wait_for_accounted_state(job, "COMPLETED")


def test_one_node_two_tasks(tmp_path):
    job = submit(tmp_path, nodes=1, tasks_per_node=2)
    results = sorted(results_within(job, JOB_TIMEOUT_S))
    node_name = results[0][3]
    assert results == [(0, 0, 2, node_name), (1, 0, 2, node_name)]
    assert node_name in ("n1", "n2")
    wait_for_accounted_state(job, "COMPLETED")
