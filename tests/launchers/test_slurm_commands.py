"""SLURM's commands as flowmill calls them, answered by fake sinfo/squeue/scontrol scripts on PATH."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from flowmill.errors import UsageError
from flowmill.launchers.slurm_commands import live_state, partitions, requeue, run_slurm


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """``fake_slurm(name, script)`` puts a shell script called ``name`` first on PATH."""
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")

    def install(name: str, script: str) -> Path:
        path = tmp_path / name
        path.write_text(f"#!/bin/sh\n{script}\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
        return path

    return install


def test_partitions_sum_nodes_and_find_the_default(fake_slurm):
    fake_slurm("sinfo", "printf 'debug* 2\\ngpu 1\\ngpu 2\\n'")
    assert partitions() == ({"debug": 2, "gpu": 3}, "debug")


def test_no_default_partition(fake_slurm):
    fake_slurm("sinfo", "echo 'gpu 4'")
    assert partitions() == ({"gpu": 4}, None)


def test_a_failing_command_is_a_usage_error_with_its_message(fake_slurm):
    fake_slurm("sinfo", "echo 'slurm_load_partitions: Unable to contact slurm controller' >&2; exit 1")
    with pytest.raises(UsageError, match="sinfo --noheader --format=%P %D failed: slurm_load_partitions: Unable to contact"):
        run_slurm("sinfo", "--noheader", "--format=%P %D")


def test_live_state(fake_slurm):
    fake_slurm("squeue", '''case "$3" in
  --jobs=7) echo RUNNING;;
  --jobs=8) echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1;;
  *) echo down >&2; exit 1;;
esac''')
    assert live_state("7") == "RUNNING"
    assert live_state("8") is None  # left the queue
    with pytest.raises(UsageError, match="down"):
        live_state("9")


def test_requeue_names_the_job(fake_slurm, tmp_path):
    fake_slurm("scontrol", f'echo "$@" > {tmp_path / "called"}')
    requeue("12_3")
    assert (tmp_path / "called").read_text().strip() == "requeue 12_3"
