"""flowmill.runs.logs: `flowmill runs logs` on a run dir whose run.json names a SLURM job, without a cluster
(the logs of real jobs are read in tests/launchers/test_slurm_job.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowmill.errors import UsageError
from flowmill.runs.logs import log_paths
from tests.flowmill.runs.store_fixture import run_cli


@pytest.fixture
def slurm_run(tmp_path: Path) -> Path:
    """A run dir whose job 17 left logs of ranks 0 (stdout and stderr) and 1 (stdout only)."""
    folder = tmp_path / "slurm"
    folder.mkdir()
    for name, text in {"17_0_log.out": "rank 0 out\n", "17_0_log.err": "rank 0 err\n", "17_1_log.out": "rank 1 out\n"}.items():
        (folder / name).write_text(text)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"slurm_job_id": "17", "slurm_folder": str(folder)}))
    return run_dir


def test_log_paths_are_the_ranks_stdout_then_stderr(slurm_run: Path) -> None:
    folder = slurm_run.parent / "slurm"
    assert log_paths(slurm_run, 0) == [folder / "17_0_log.out", folder / "17_0_log.err"]
    assert log_paths(slurm_run, 1) == [folder / "17_1_log.out"]


def test_logs_command_prints_each_file_under_its_name(slurm_run: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run_cli(capsys, "runs", "logs", str(slurm_run))
    folder = slurm_run.parent / "slurm"
    assert (code, err) == (0, "")
    assert out == f"==> {folder / '17_0_log.out'} <==\nrank 0 out\n==> {folder / '17_0_log.err'} <==\nrank 0 err\n"


def test_logs_of_a_rank_without_logs_name_the_ranks_that_have_some(slurm_run: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run_cli(capsys, "runs", "logs", str(slurm_run), "--rank", "2")
    assert (code, out) == (2, "")
    assert err.startswith("flowmill: error: no logs of rank 2 for job 17") and "ranks with logs: 0, 1" in err


def test_a_run_without_a_slurm_job_is_refused(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text(json.dumps({"run_id": "0" * 32}))
    with pytest.raises(UsageError, match="run.json names no SLURM job"):
        log_paths(tmp_path, 0)
