"""tests/needs.py: the skip reasons of tests that need more than the venv, and the run's last line about them."""

from __future__ import annotations

import pytest

from tests import needs


@pytest.mark.parametrize("uid, sudo", [(0, ""), (1000, "sudo ")])
def test_summary_counts_the_skips_of_each_need_and_names_its_command(monkeypatch, uid, sudo):
    monkeypatch.setattr(needs.os, "geteuid", lambda: uid)
    reasons = [needs.skip_reason(needs.CLUSTER, "no sbatch")] * 3 + [
        needs.skip_reason(needs.CHROMIUM, "chromium is not installed"), "no GPU visible"]
    assert reasons[0] == f"needs the local SLURM cluster (no sbatch); run `{sudo}make slurm-up`"
    assert needs.summary_line(reasons) == (
        f"flowmill: skipped 3 tests that need the local SLURM cluster (`{sudo}make slurm-up`), "
        f"1 test that needs Chromium (`{sudo}make chromium`)")
    assert needs.summary_line(["no GPU visible"]) is None
