"""Fixtures of the launcher tests."""

from __future__ import annotations

import subprocess

import pytest


@pytest.fixture(scope="module")
def slurm_controller():
    """Fails early, with the fix, when SLURM is installed but its controller does not answer."""
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    if ping.returncode != 0:
        pytest.fail(f"SLURM is installed but slurmctld does not answer ({ping.stdout.strip()}); run `make slurm-up`")
