"""Fixtures of the launcher tests; SLURM's commands, and the jobs they submit, use the local test cluster."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.launchers.cluster import MISSING, TEST_CLUSTER_CONF
from tests.needs import CLUSTER, skip_reason

if MISSING is None:
    os.environ["SLURM_CONF"] = str(TEST_CLUSTER_CONF)


@pytest.fixture(scope="module")
def slurm_controller():
    """Skips when the local cluster's slurmctld does not answer, or fails then, with the fix, when root runs the
    tests: `make test` as root has just brought the cluster up, so a silent controller there is a fault."""
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    if ping.returncode != 0:
        answer = (ping.stdout or ping.stderr).strip().partition("\n")[0]
        if os.geteuid() == 0:
            pytest.fail(f"the local SLURM cluster is set up but slurmctld does not answer ({answer}); run `make slurm-up`")
        pytest.skip(skip_reason(CLUSTER, f"slurmctld does not answer: {answer}"))
