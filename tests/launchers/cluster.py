"""Helpers for the tests that run `flowmill launch slurm` on the local SLURM cluster (`make slurm-up`).

The tests use that cluster only, never another SLURM installation of the machine: conftest.py
points SLURM_CONF at the configuration up.sh writes, and without it they skip.
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
from tests.needs import CLUSTER, skip_reason

JOB_TIMEOUT_S = 600  # submit → end of one job; a quiet machine needs ~30-60 s, a loaded one several times that
END_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL", "DEADLINE"}
TEST_CLUSTER_CONF = Path("/etc/flowmill-slurm/slurm.conf")  # written by launchers/slurm_cluster/up.sh (common.sh)


def cluster_missing() -> str | None:
    """Why this machine has no local test cluster to submit to (a skip reason), or None."""
    if shutil.which("sbatch") is None:
        return skip_reason(CLUSTER, "SLURM is not installed: no sbatch")
    if not TEST_CLUSTER_CONF.is_file():
        return skip_reason(CLUSTER, f"no {TEST_CLUSTER_CONF}")
    return None


MISSING = cluster_missing()
# On a machine with the cluster: skipped when slurmctld does not answer, failed instead when root runs them
# (the slurm_controller fixture of conftest.py).
NEEDS_CLUSTER = [
    pytest.mark.slurm,
    pytest.mark.xdist_group("slurm"),  # one worker: one cluster
    pytest.mark.skipif(MISSING is not None, reason=MISSING or ""),
    pytest.mark.usefixtures("slurm_controller"),
]
ON_CLUSTER = [pytest.mark.slow, *NEEDS_CLUSTER]


def on_cluster(test):
    """Mark ``test`` as one that needs the local cluster (skipped without SLURM, one xdist worker)."""
    for mark in ON_CLUSTER:
        test = mark(test)
    return test


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


def run_json(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())
