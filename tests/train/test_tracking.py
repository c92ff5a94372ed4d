"""flowmill.train.tracking against real MLflow: an embedded SQLite store (a real `mlflow server` that dies mid-run:
tests/train/test_tracking_undelivered.py)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from flowmill.train import tracking, tracking_store
from flowmill.train.images import image_grid
from flowmill.train.tracking import MLflowTracker, NullTracker
from flowmill.train.tracking_params import flatten_config
from tests.remote_helpers import BUCKET, STORE_GROUP
from tests.train.test_tracking_params import Config

STEP_METRICS = ("train/loss", "train/lr", "train/grad_norm", "train/samples_per_s")


def step_metrics(step: int) -> dict[str, float]:
    return {"train/loss": 1.0 / step, "train/lr": 1e-4 * step, "train/grad_norm": 0.5, "train/samples_per_s": 100.0}


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One store for the module, as runs under one `runs/` share it (creating the SQLite schema costs seconds)."""
    return tmp_path_factory.mktemp("runs")


@pytest.fixture
def uri(runs_root: Path) -> str:
    return tracking_store.default_tracking_uri(runs_root)


def flowmill_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [rec.getMessage() for rec in caplog.records if rec.name == "flowmill" and rec.levelno == logging.WARNING]


def test_default_tracking_uri_is_sqlite_under_runs_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    uri = tracking_store.default_tracking_uri(Path("runs"))
    assert uri == f"sqlite:///{tmp_path.resolve()}/runs/mlflow.db"
    assert tracking_store.sqlite_artifact_location(uri) == (tmp_path.resolve() / "runs" / "mlartifacts").as_uri()
    assert tracking_store.sqlite_artifact_location("http://127.0.0.1:5000") is None


def test_new_run_records_params_metrics_tags_and_artifacts(uri: str, runs_root: Path, tmp_path: Path) -> None:
    tracker = MLflowTracker.start(uri, "new-run", "first", tags={"flowmill.world_size": "2"}, system_metrics=False)
    assert isinstance(tracker, MLflowTracker)
    tracker.log_params(flatten_config(Config()))
    for step in range(1, 4):
        tracker.log_metrics(step_metrics(step), step=step)
    grid = image_grid(torch.zeros(4, 3, 8, 8))
    tracker.log_image(grid, key="samples", step=3)
    tracker.log_text("lr: 0.0003\n", "config.yaml")
    checkpoint_index = tmp_path / "checkpoints.txt"
    checkpoint_index.write_text("step 3\n")
    tracker.log_artifact(checkpoint_index, "checkpoints")
    tracker.set_tags({"flowmill.note": "hello"})
    tracker.finish()

    client = MlflowClient(uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "first"
    assert run.data.params["model.depth"] == "2"
    assert run.data.tags["flowmill.world_size"] == "2"
    assert run.data.tags["flowmill.note"] == "hello"
    for key in STEP_METRICS:
        history = client.get_metric_history(tracker.run_id, key)
        assert sorted((point.step, point.value) for point in history) == [(s, step_metrics(s)[key]) for s in (1, 2, 3)]
    artifact_dir = runs_root / "mlartifacts" / tracker.run_id / "artifacts"
    assert (artifact_dir / "config.yaml").read_text() == "lr: 0.0003\n"
    assert (artifact_dir / "checkpoints" / "checkpoints.txt").read_text() == "step 3\n"
    assert [path.name.split("+")[:3] for path in (artifact_dir / "images").glob("*.png")] == [["samples", "step", "3"]]
    assert tracker.failures == 0


def test_resume_continues_same_run_without_duplicate_steps(uri: str, caplog: pytest.LogCaptureFixture) -> None:
    first = MLflowTracker.start(uri, "resume", "r", system_metrics=False)
    first.log_params({"lr": "0.1", "depth": "2"})
    for step in range(1, 6):
        first.log_metrics(step_metrics(step), step=step)
    first.finish("KILLED")  # preempted after step 5; the last checkpoint was written at step 3

    resumed = MLflowTracker.start(uri, "resume", "r", run_id=first.run_id, system_metrics=False)
    assert isinstance(resumed, MLflowTracker)
    assert resumed.run_id == first.run_id
    assert resumed.resumed_through_step == 5
    assert resumed.last_logged_step() == 5
    client = MlflowClient(uri)
    assert client.get_run(first.run_id).info.status == "RUNNING"
    resumed.log_params({"lr": "0.2", "depth": "2", "ema": "0.999"})
    for step in range(4, 9):  # the loop replays steps 4 and 5 from the checkpoint
        resumed.log_metrics(step_metrics(step), step=step)
    resumed.finish()

    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.1", "depth": "2", "ema": "0.999"}
    assert run.data.tags["resume.changed_param.lr"] == "0.2"
    assert "resume.changed_param.depth" not in run.data.tags
    steps = sorted(point.step for point in client.get_metric_history(first.run_id, "train/loss"))
    assert steps == list(range(1, 9))
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert flowmill_warnings(caplog) == []


def test_resume_of_unknown_run_id_starts_a_new_run(uri: str, caplog: pytest.LogCaptureFixture) -> None:
    tracker = MLflowTracker.start(uri, "unknown", "r", run_id="0" * 32, system_metrics=False)
    assert isinstance(tracker, MLflowTracker)
    assert tracker.run_id != "0" * 32
    assert tracker.resumed_through_step == 0
    tracker.finish()
    assert len(flowmill_warnings(caplog)) == 1
    assert "0" * 32 in flowmill_warnings(caplog)[0]


def test_system_metrics_are_logged(uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", raising=False)
    tracker = MLflowTracker.start(uri, "system", "r", system_metrics=True, system_metrics_interval_s=0.3)
    time.sleep(1.5)
    tracker.finish()
    metrics = MlflowClient(uri).get_run(tracker.run_id).data.metrics
    assert metrics["system/cpu_utilization_percentage"] >= 0
    assert metrics["system/system_memory_usage_megabytes"] > 0


def test_rejected_call_is_dropped_once_and_later_calls_still_land(
    uri: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tracker = MLflowTracker.start(uri, "rejected", "r", system_metrics=False)
    tracker.log_artifact(tmp_path / "missing.png")
    tracker.log_artifact(tmp_path / "missing-too.png")
    tracker.log_metrics(step_metrics(1), step=1)
    tracker.finish()
    assert (tracker.failures, tracker.dropped) == (2, 2)
    warnings = flowmill_warnings(caplog)
    assert len(warnings) == 1 and "rejected log_artifact" in warnings[0]
    assert MlflowClient(uri).get_run(tracker.run_id).data.metrics["train/loss"] == 1.0


class FlakyClient:
    """A real MlflowClient whose store can be switched off, failing like an overloaded server (503)."""

    def __init__(self, uri: str) -> None:
        self.real = MlflowClient(uri)
        self.down = False
        self.attempts = 0

    def __getattr__(self, name: str):
        method = getattr(self.real, name)

        def call(*args, **kwargs):
            self.attempts += 1
            if self.down:
                raise MlflowException("store is down", error_code="TEMPORARILY_UNAVAILABLE")
            return method(*args, **kwargs)

        return call


def flaky_tracker(uri: str, retry_after_s: float, max_queued_calls: int = 100) -> tuple[MLflowTracker, FlakyClient]:
    client = FlakyClient(uri)
    run = client.real.create_run(tracking._get_or_create_experiment(client.real, "flaky", None))
    tracker = MLflowTracker(client, run.info.run_id, run.info.experiment_id, uri, 0, {}, None, retry_after_s,
                            max_queued_calls)  # fmt: skip
    return tracker, client


def test_outage_queues_calls_and_sends_them_in_order_later(uri: str, caplog: pytest.LogCaptureFixture) -> None:
    tracker, client = flaky_tracker(uri, retry_after_s=60.0)
    tracker.log_metrics(step_metrics(1), step=1)
    client.down = True
    tracker.log_metrics(step_metrics(2), step=2)
    assert client.attempts == 2
    tracker.log_metrics(step_metrics(3), step=3)
    tracker.set_tags({"phase": "down"})
    assert client.attempts == 2  # within retry_after_s nothing is sent
    client.down = False
    tracker.log_metrics(step_metrics(4), step=4)
    assert client.attempts == 2
    tracker.finish()  # sends the queue whatever the delay
    history = client.real.get_metric_history(tracker.run_id, "train/loss")
    assert sorted(point.step for point in history) == [1, 2, 3, 4]
    run = client.real.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["phase"] == "down"
    assert (tracker.failures, tracker.dropped) == (1, 0)
    warnings = flowmill_warnings(caplog)
    assert len(warnings) == 1 and "unreachable" in warnings[0] and "training continues" in warnings[0]


def test_outage_retries_after_delay_and_bounds_the_queue(uri: str, caplog: pytest.LogCaptureFixture) -> None:
    tracker, client = flaky_tracker(uri, retry_after_s=0.0, max_queued_calls=2)
    client.down = True
    for step in (1, 2, 3):
        tracker.log_metrics(step_metrics(step), step=step)
    assert (client.attempts, tracker.failures, tracker.dropped) == (3, 3, 1)  # each call retried; step 1 evicted
    client.down = False
    tracker.log_metrics(step_metrics(4), step=4)  # queued first, evicting step 2, then the queue is sent
    history = client.real.get_metric_history(tracker.run_id, "train/loss")
    assert sorted(point.step for point in history) == [3, 4]
    assert tracker.dropped == 2
    assert len(flowmill_warnings(caplog)) == 1
    tracker.finish()


def test_unreachable_server_falls_back_fast_with_one_warning(
    clean_http_env: None, caplog: pytest.LogCaptureFixture
) -> None:
    began = time.monotonic()
    tracker = MLflowTracker.start("http://127.0.0.1:9", "down", "r", run_id="abc")
    assert time.monotonic() - began < 10
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == tracking.HTTP_ENV_DEFAULTS["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
    assert isinstance(tracker, NullTracker)
    assert tracker.run_id == "abc"  # a later resume can still continue the run the checkpoint names
    tracker.log_params({"lr": "0.1"})
    tracker.log_metrics(step_metrics(1), step=1)
    tracker.finish("FAILED")
    warnings = flowmill_warnings(caplog)
    assert len(warnings) == 1 and "unreachable" in warnings[0] and "training continues" in warnings[0]
    assert MLflowTracker.start("http://127.0.0.1:9", "down", "r").run_id is None


def test_finish_refuses_unknown_status(uri: str) -> None:
    with pytest.raises(ValueError, match="choose one of: FINISHED, FAILED, KILLED"):
        NullTracker().finish("DONE")
    tracker = MLflowTracker.start(uri, "status", "r", system_metrics=False)
    with pytest.raises(ValueError, match="choose one of: FINISHED, FAILED, KILLED"):
        tracker.finish("DONE")
    tracker.finish("FAILED")
    assert MlflowClient(uri).get_run(tracker.run_id).info.status == "FAILED"


def test_a_description_and_sample_files_show_in_the_ui(uri: str, runs_root: Path, tmp_path: Path) -> None:
    tracker = MLflowTracker.start(uri, "samples", "described", tags={"team": "vision"}, description="**lr** sweep",
                                  system_metrics=False)
    grid = tmp_path / "grid-00000010.png"
    image_grid(torch.zeros(2, 1, 8, 8)).save(grid)
    text = tmp_path / "text-00000010.txt"
    text.write_text("a sample")
    tracking.log_samples(tracker, [grid, text], step=10)
    tracker.finish()

    run = MlflowClient(uri).get_run(tracker.run_id)
    assert run.data.tags[tracking.DESCRIPTION_TAG] == "**lr** sweep" and run.data.tags["team"] == "vision"
    artifact_dir = runs_root / "mlartifacts" / tracker.run_id / "artifacts"
    # The PNG is an image of the series "grid" at step 10 (the UI's step slider); other files stay artifacts.
    assert [path.name.split("+")[:3] for path in (artifact_dir / "images").glob("*.png")] == [["grid", "step", "10"]]
    assert (artifact_dir / "samples" / "text-00000010.txt").read_text() == "a sample"
    assert not (artifact_dir / "samples" / grid.name).exists()


@pytest.mark.xdist_group(STORE_GROUP)
def test_artifacts_go_to_an_s3_server(s3_digits, uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in s3_digits.env.items():  # boto3 in MLflow finds the server through the standard variables
        monkeypatch.setenv(name, value)
    tracker = MLflowTracker.start(uri, "on-s3", "r", system_metrics=False, artifact_location=f"s3://{BUCKET}/mlflow")
    assert isinstance(tracker, MLflowTracker)
    tracker.log_text("a: 1\n", "config.yaml")
    tracker.log_image(image_grid(torch.zeros(4, 3, 8, 8)), key="grid", step=1)
    tracker.finish()
    stored = s3_digits.keys(f"mlflow/{tracker.run_id}/artifacts/")
    assert f"mlflow/{tracker.run_id}/artifacts/config.yaml" in stored
    assert any(key.startswith(f"mlflow/{tracker.run_id}/artifacts/images/grid") for key in stored), stored
    assert MlflowClient(uri).get_run(tracker.run_id).info.artifact_uri == f"s3://{BUCKET}/mlflow/{tracker.run_id}/artifacts"
    config = MlflowClient(uri).download_artifacts(tracker.run_id, "config.yaml", str(tmp_path))
    assert Path(config).read_text() == "a: 1\n"
