"""Bad input and dying processes: one clear line, non-zero exit, nothing overwritten, nothing left hanging.

Bad input is refused before any worker starts, so those cases run the CLI in this process."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from flowmill.cli import main
from flowmill.data.shards import dataset_shards
from flowmill.data.streams import StreamPlan
from flowmill.train.config import load_config
from tests.helpers import TINY_CONFIG, flowmill, tiny_overrides

pytestmark = pytest.mark.slow


def refused(capsys, *argv: str) -> tuple[int, str]:
    """Run the CLI in this process (bad input is refused before any worker starts): (exit code, stderr)."""
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_no_shards_is_a_config_error(tmp_path, digits_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, stderr = refused(capsys, "launch", "local", "--nproc", "2", str(TINY_CONFIG),
                           *tiny_overrides(digits_dir, tmp_path / "r", **{"data.path": str(tmp_path / "empty")}))
    assert code == 2
    assert str(tmp_path / "empty") in stderr
    assert not (tmp_path / "r").exists()


def test_run_dir_holding_a_run_is_refused(finished_run, digits_dir, capsys):
    before = (finished_run / "config.yaml").read_text()
    code, stderr = refused(capsys, "launch", "local", "--nproc", "1", str(TINY_CONFIG), *tiny_overrides(digits_dir, finished_run))
    assert code == 2
    assert "already holds a run" in stderr and "flowmill resume" in stderr
    assert (finished_run / "config.yaml").read_text() == before


def test_resume_with_another_model_is_refused(finished_run, capsys):
    code, stderr = refused(capsys, "resume", str(finished_run), "model.depth=3", "trainer.max_steps=6")
    assert code == 2
    assert "model.depth" in stderr


def test_corrupt_latest_is_refused(finished_run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    (copy / "latest").write_text("checkpoints/step-9999\n")
    code, stderr = refused(capsys, "resume", str(copy), "trainer.max_steps=6")
    assert code == 2
    assert "corrupt" in stderr and "step-00000004" in stderr


def test_finished_run_records_status_and_latest(finished_run):
    info = json.loads((finished_run / "run.json").read_text())
    for key in ("tracking_uri", "experiment_id", "run_id", "git_commit", "world_size", "status"):
        assert key in info
    assert info["status"] == "finished" and info["world_size"] == 1
    assert (finished_run / "latest").read_text().strip() == "checkpoints/step-00000004"
    assert (finished_run / "checkpoints" / "step-00000002" / "flowmill.json").is_file()
    assert list((finished_run / "samples").glob("grid-*.png"))


def launch_endless_run(digits_dir, run_dir, cwd) -> subprocess.Popen:
    """``flowmill launch local --nproc 2`` of a run too long to finish, returned once it has logged a step."""
    launcher = subprocess.Popen(
        [sys.executable, "-m", "flowmill.cli", "launch", "local", "--nproc", "2", str(TINY_CONFIG),
         *tiny_overrides(digits_dir, run_dir, **{"trainer.max_steps": 100000, "checkpoint.every_steps": 100000})],
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    metrics = run_dir / "logs" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and metrics.stat().st_size > 0):
        assert launcher.poll() is None and time.time() < deadline, "the job never started training"
        time.sleep(0.5)
    return launcher


def damage_the_first_shard_of(rank: int, data: Path, world_size: int) -> Path:
    """Change the last byte of the shard ``rank`` reads first (trailing tar padding: every sample still reads,
    but the shard no longer matches its manifest's sha256, which the rank finds when it has read it all)."""
    cfg = load_config(TINY_CONFIG, [f"data.path={data}"])
    plan = StreamPlan(dataset_shards(data), rank, world_size, max(1, cfg.data.num_workers), cfg.trainer.seed,
                      cfg.data.shuffle_buffer, verify=True)
    shard = Path(plan.shards_for(epoch=0, worker=0)[0].url)
    damaged = bytearray(shard.read_bytes())
    damaged[-1] ^= 0xFF
    shard.write_bytes(damaged)
    return shard


def test_a_rank_that_fails_ends_the_job_naming_itself_and_the_cause_first(digits_dir, tmp_path):
    """A data error on rank 1 only: its one line comes first, before anything another rank or the
    launcher says; no traceback reaches the terminal (it is in logs/train.log); the launcher names
    the rank and the cause, exits non-zero, no worker survives; run.json and MLflow say failed."""
    data = tmp_path / "data"
    shutil.copytree(digits_dir, data)
    shard = damage_the_first_shard_of(1, data, world_size=2)
    run_dir = tmp_path / "run"
    with open(tmp_path / "stderr", "w") as stderr_file:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "flowmill.cli", "launch", "local", "--nproc", "2", str(TINY_CONFIG),
             *tiny_overrides(digits_dir, run_dir, **{"data.path": data, "trainer.max_steps": 1000,
                                                    "checkpoint.every_steps": 1000})],
            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=stderr_file, text=True,
        )
        everything = {}  # every process the job started (ranks, their data workers), by pid
        deadline = time.time() + 600
        while launcher.poll() is None:
            assert time.time() < deadline, "the job did not end"
            with contextlib.suppress(psutil.NoSuchProcess):
                everything.update({p.pid: p for p in psutil.Process(launcher.pid).children(recursive=True)})
            time.sleep(0.2)
    stderr = (tmp_path / "stderr").read_text()
    assert launcher.returncode == 1, stderr[-3000:]
    cause = f"ShardChecksumError: shard {shard} does not match its manifest"
    # Before the failure: rank 0's log of a run going well (run dir, MLflow, steps), MLflow making its store.
    going_well = [line.startswith("[flowmill rank 0] ") and " fatal: " not in line and " stopped: " not in line
                  or " INFO mlflow." in line for line in stderr.splitlines()]
    said = [line for line, well in zip(stderr.splitlines(), going_well) if not well]
    assert said[0].startswith(f"[flowmill rank 1] fatal: {cause}"), stderr[-3000:]
    assert said[0].endswith(f"(traceback in {run_dir / 'logs' / 'train.log'})")
    assert f"flowmill: rank 1 failed (exit code 1): {cause}" in stderr
    assert "Traceback" not in stderr, stderr[-3000:]
    time.sleep(1)
    assert len(everything) >= 2 and not [p for p in everything.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    log = (run_dir / "logs" / "train.log").read_text()
    assert f"ERROR rank 1: the run stopped (failed): {cause}" in log and "Traceback" in log
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "failed" and info["step"] >= 1
    with sqlite3.connect(tmp_path / "mlflow.db") as store:
        assert store.execute("select status from runs where run_uuid = ?", (info["run_id"],)).fetchone() == ("FAILED",)
    assert not list(run_dir.glob(".*.tmp-*"))


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT], ids=lambda signum: signum.name)
def test_a_launcher_stopped_by_a_signal_leaves_no_worker_and_records_the_run_killed(digits_dir, tmp_path, signum):
    """SIGTERM or Ctrl-C (SIGINT) to the launcher stops the job cleanly: one line, no traceback, exit
    128 + N. SIGKILL (as the OOM killer sends it) cannot be handled by the launcher: its workers
    notice it is gone and stop by themselves. Either way every worker leaves within seconds and the
    run is recorded as killed in run.json and MLflow; nothing keeps writing into the run dir."""
    run_dir = tmp_path / "run"
    launcher = launch_endless_run(digits_dir, run_dir, tmp_path)
    everything = psutil.Process(launcher.pid).children(recursive=True)
    launcher.send_signal(signum)
    _, stderr = launcher.communicate(timeout=60)
    deadline = time.time() + 30
    while [p for p in everything if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]:
        assert time.time() < deadline, "workers outlived their launcher"
        time.sleep(0.2)
    reason = "its launcher is gone" if signum == signal.SIGKILL else f"received {signum.name}"
    assert stderr.count(f"stopped: {reason}") == 2, stderr[-3000:]
    if signum != signal.SIGKILL:
        assert launcher.returncode == 128 + signum
        assert f"flowmill: stopped by {signum.name}; the workers were stopped; run dir: {run_dir}" in stderr
        assert "Traceback" not in stderr and "SignalException" not in stderr, stderr[-3000:]
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "killed" and info["step"] >= 1
    with sqlite3.connect(tmp_path / "mlflow.db") as store:
        assert store.execute("select status from runs where run_uuid = ?", (info["run_id"],)).fetchone() == ("KILLED",)
    assert not list(run_dir.glob(".*.tmp-*"))
    assert f"Stopped: {reason}" in (run_dir / "logs" / "train.log").read_text()


def test_unreachable_tracking_server_does_not_stop_training(digits_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = flowmill(
        "train", str(TINY_CONFIG),
        *tiny_overrides(digits_dir, run_dir, **{"trainer.max_steps": 3, "tracking.uri": "http://127.0.0.1:9"}),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    assert len((run_dir / "logs" / "metrics.jsonl").read_text().splitlines()) == 3
    warnings = [line for line in result.stderr.splitlines() if "is unreachable" in line]
    assert len(warnings) == 1, result.stderr[-3000:]
