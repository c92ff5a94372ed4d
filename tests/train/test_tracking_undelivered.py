"""Tracking calls MLflow could not take: kept in the run dir by the tracker, sent later by `flowmill runs sync`
(flowmill.train.tracking_undelivered), each metric step once, the final status last."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from flowmill.cli import main
from flowmill.run_dir import RunDir
from flowmill.train.distributed import free_port
from flowmill.train.job import start_tracker
from flowmill.train.loop import run_job
from flowmill.train.preemption import StopRequest
from flowmill.train.tracking import MLflowTracker, end_run
from flowmill.train.tracking_store import default_tracking_uri
from flowmill.train.tracking_undelivered import UndeliveredCalls, send
from tests.train.test_loop import ALONE, Batches, stand_in_job
from tests.train.test_tracking import FlakyClient, step_metrics


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SQLite store for the module (creating its schema costs seconds), made before a server opens it."""
    root = tmp_path_factory.mktemp("store")
    MlflowClient(default_tracking_uri(root)).search_experiments()
    return root


def start_server(runs_root: Path, artifacts: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on the store of ``runs_root``, whose schema already exists (creating it doubles the start time)."""
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", default_tracking_uri(runs_root), "--artifacts-destination", str(artifacts),
    ]  # fmt: skip
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).ok:
                return server
        except requests.ConnectionError:
            time.sleep(0.2)
    stop_server(server)
    pytest.fail("mlflow server did not answer within 120 s")


def stop_server(server: subprocess.Popen) -> None:
    """Stop the server's whole process group (it serves from a worker process of its own)."""
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def steps_of(client: MlflowClient, run_id: str, key: str = "train/loss") -> list[int]:
    return sorted(point.step for point in client.get_metric_history(run_id, key))


def flowmill_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "flowmill" and record.levelno == logging.WARNING]


class ServerKillingBatches(Batches):
    """The stand-in job's batches; the tracking server is stopped when the loop asks for the first
    micro-batch of step ``after_step + 1`` (2 micro-batches a step), and never started again."""

    def __init__(self, server: subprocess.Popen, after_step: int):
        self.server, self.after_step = server, after_step

    def __iter__(self):
        for index, batch in enumerate(super().__iter__()):
            if index == 2 * self.after_step:
                stop_server(self.server)
            yield batch


def test_a_server_killed_mid_run_loses_nothing_once_runs_sync_reaches_it_again(
    store_root: Path, tmp_path: Path, clean_http_env: None, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture
) -> None:
    """The real loop and tracker against a real `mlflow server` that dies after step 15 of 30: training
    goes on (one warning, one failed attempt per tracking.retry_after_s), the run ends saying what it
    could not deliver, and `flowmill runs sync` sends it once the server is back: every step once,
    the final status, the sample artifact of the last step."""
    artifacts = tmp_path / "served-artifacts"
    port = free_port()
    server_uri = f"http://127.0.0.1:{port}"
    server = start_server(store_root, artifacts, port)
    try:
        job = stand_in_job(tmp_path, "trainer.max_steps=30", "trainer.eval_every_steps=0", "trainer.sample_every_steps=0",
                           "checkpoint.every_steps=100", f"tracking.uri={server_uri}", "tracking.retry_after_s=600")
        # A checkpoint without EMA weights: the finished run logs no model (the stand-in saves no files).
        checkpoint = job.run_dir.checkpoints / "step-00000030"
        checkpoint.mkdir()
        (checkpoint / "flowmill.json").write_text(json.dumps({"step": 30, "world_size": 1, "family": "mmdit"}))
        job.run_dir.latest_file.write_text("checkpoints/step-00000030\n")
        job.tracker = start_tracker(job.cfg, job.plan, ALONE, {})
        assert isinstance(job.tracker, MLflowTracker)
        job.run_dir.update_info(status="running", step=0, run_id=job.tracker.run_id, tracking_uri=server_uri)
        job.loader = ServerKillingBatches(server, after_step=15)
        assert run_job(job, 0, StopRequest()) == "finished"
    finally:
        if server.poll() is None:
            stop_server(server)

    assert job.run_dir.info()["status"] == "finished"
    assert job.tracker.failures == 2  # the first call after the server died, and the final one
    # 15 steps' metrics, the sample artifact of step 30 and the final status could not be delivered.
    calls = [record["call"] for record in UndeliveredCalls(job.run_dir).read()]
    assert calls == ["log_metrics"] * 15 + ["log_artifact", "finish"]
    warnings = flowmill_warnings(caplog)
    assert len(warnings) == 2 and "unreachable" in warnings[0] and "training continues" in warnings[0]
    assert warnings[1] == f"17 tracking calls could not be delivered to MLflow; send them with: flowmill runs sync {job.run_dir}"
    assert [record for record in caplog.records if record.name == "flowmill"][-1].getMessage() == warnings[1]

    # While the server is down, a sync says so and keeps every call.
    assert main(["runs", "sync", str(job.run_dir)]) == 2
    assert f"the 17 calls stay in {job.run_dir.undelivered_file}" in capsys.readouterr().err
    assert len(UndeliveredCalls(job.run_dir).read()) == 17

    server = start_server(store_root, artifacts, port)
    try:
        assert main(["runs", "sync", str(job.run_dir)]) == 0
        assert "sent 17 of 17 tracking calls" in capsys.readouterr().out
        client = MlflowClient(server_uri)
        run = client.get_run(job.tracker.run_id)
        assert steps_of(client, run.info.run_id) == list(range(1, 31))
        assert steps_of(client, run.info.run_id, "val/loss") == [30]
        assert run.info.status == "FINISHED" and run.data.params["trainer.max_steps"] == "30"
        assert {item.path for item in client.list_artifacts(run.info.run_id)} == {"config.yaml", "samples"}
        assert [item.path for item in client.list_artifacts(run.info.run_id, "samples")] == ["samples/samples-30.txt"]
        assert not job.run_dir.undelivered_file.parent.exists()
        assert main(["runs", "sync", str(job.run_dir)]) == 0
        assert capsys.readouterr().out.startswith("nothing to send")
    finally:
        stop_server(server)


def queued_run(uri: str, run_dir: RunDir, logged_steps: range, kept_steps: range, status: str = "KILLED") -> str:
    """An MLflow run holding ``logged_steps`` and a run dir keeping ``kept_steps``, a param and ``status`` as undelivered."""
    client = MlflowClient(uri)
    tracker = MLflowTracker.start(uri, "undelivered", "r", system_metrics=False)
    tracker.log_params({"optim.lr": "0.1"})
    for step in logged_steps:
        tracker.log_metrics(step_metrics(step), step=step)
    records = [{"call": "log_metrics", "step": step, "timestamp": 1, "metrics": step_metrics(step)} for step in kept_steps]
    records += [{"call": "log_params", "params": {"optim.lr": "0.1", "model.depth": "2"}, "tags": {}},
                {"call": "set_tags", "tags": {"phase": "late"}},
                {"call": "finish", "status": status, "end_time": 1_767_225_660_000}]
    UndeliveredCalls(run_dir).append((record, None) for record in records)
    assert client.get_run(tracker.run_id).info.status == "RUNNING"
    return tracker.run_id


class StoreDownAtStep:
    """A real MlflowClient whose store stops answering (503) when metrics of ``step`` are logged."""

    def __init__(self, uri: str, step: int) -> None:
        self.real, self.step = MlflowClient(uri), step

    def __getattr__(self, name: str):
        return getattr(self.real, name)

    def log_batch(self, run_id: str, metrics=(), **kwargs):
        if any(metric.step == self.step for metric in metrics):
            raise MlflowException("store is down", error_code="TEMPORARILY_UNAVAILABLE")
        return self.real.log_batch(run_id, metrics=metrics, **kwargs)


def test_send_skips_steps_mlflow_holds_and_continues_where_a_failed_sync_stopped(store_root: Path, tmp_path: Path) -> None:
    uri = default_tracking_uri(store_root)
    run_dir = RunDir(tmp_path / "run")
    run_id = queued_run(uri, run_dir, logged_steps=range(1, 5), kept_steps=range(3, 7))  # steps 3 and 4 were delivered too
    calls = UndeliveredCalls(run_dir)
    result = send(StoreDownAtStep(uri, step=6), run_id, calls)
    assert (result.sent, result.already_held, result.remaining, result.status) == (1, 8, 4, None)
    assert [record["call"] for record in calls.read()] == ["log_metrics", "log_params", "set_tags", "finish"]

    result = send(MlflowClient(uri), run_id, calls)
    assert (result.sent, result.remaining, result.status, result.rejected) == (4, 0, "KILLED", [])
    run = MlflowClient(uri).get_run(run_id)
    assert steps_of(MlflowClient(uri), run_id) == [1, 2, 3, 4, 5, 6]
    assert run.data.params == {"optim.lr": "0.1", "model.depth": "2"} and run.data.tags["phase"] == "late"
    assert (run.info.status, run.info.end_time) == ("KILLED", 1_767_225_660_000)
    assert not calls.exists()


def test_a_resumed_run_sends_what_its_earlier_attempt_kept_and_skips_those_steps(store_root: Path, tmp_path: Path) -> None:
    uri = default_tracking_uri(store_root)
    run_dir = RunDir(tmp_path / "run")
    run_id = queued_run(uri, run_dir, logged_steps=range(1, 4), kept_steps=range(4, 9))
    tracker = MLflowTracker.start(uri, "undelivered", "r", run_id=run_id, system_metrics=False, run_dir=run_dir)
    assert tracker.resumed_through_step == 8  # a resume from step 5 recomputes steps 6-8: they are not logged twice
    assert not UndeliveredCalls(run_dir).exists()
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "RUNNING"  # the earlier attempt's status is not the run's any more
    tracker.finish()
    assert steps_of(MlflowClient(uri), run_id) == list(range(1, 9))


def test_the_oldest_queued_call_goes_to_the_run_dir_when_the_queue_is_full(store_root: Path, tmp_path: Path) -> None:
    uri = default_tracking_uri(store_root)
    client = FlakyClient(uri)
    run = client.real.create_run(client.real.create_experiment("full"))
    run_dir = RunDir(tmp_path / "run")
    tracker = MLflowTracker(client, run.info.run_id, run.info.experiment_id, uri, 0, {}, None, retry_after_s=0.0,
                            max_queued_calls=2, run_dir=run_dir)  # fmt: skip
    client.down = True
    for step in (1, 2, 3):
        tracker.log_metrics(step_metrics(step), step=step)
    assert [record["step"] for record in UndeliveredCalls(run_dir).read()] == [1]
    tracker.finish()
    assert (tracker.dropped, tracker.undelivered) == (0, 4)
    assert [record["call"] for record in UndeliveredCalls(run_dir).read()] == ["log_metrics"] * 3 + ["finish"]
    assert client.real.get_run(run.info.run_id).data.metrics == {}


def test_a_launchers_final_status_waits_with_the_undelivered_calls_when_the_store_is_down(
    tmp_path: Path, clean_http_env: None
) -> None:
    run_dir = RunDir(tmp_path / "run")
    run_dir.path.mkdir()
    run_dir.update_info(status="failed", tracking_uri="http://127.0.0.1:9", run_id="0" * 32)
    assert end_run(run_dir, "FAILED") is False
    [record] = UndeliveredCalls(run_dir).read()
    assert (record["call"], record["status"]) == ("finish", "FAILED")
