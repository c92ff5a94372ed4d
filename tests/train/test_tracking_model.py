"""flowmill.train.tracking_model, and what a finished run shows in MLflow: the shared tiny CLI run
(``finished_run``) read back from its store, and the runs whose model cannot be logged."""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
import numpy as np
import torch
import yaml
from mlflow import MlflowClient

from flowmill.models import load_model
from flowmill.run_dir import RunDir
from flowmill.train.tracking import MLflowTracker
from flowmill.train.tracking_model import not_loggable
from tests.helpers import fake_run


def test_a_finished_run_shows_its_name_tags_config_samples_and_registered_ema_model(finished_run: Path, tmp_path: Path,
                                                                                   monkeypatch):
    info = RunDir(finished_run).info()
    client = MlflowClient(info["tracking_uri"])
    run = client.get_run(info["run_id"])
    assert run.info.run_name == finished_run.name and run.info.status == "FINISHED"
    assert run.data.tags["team"] == "tests" and run.data.tags["flowmill.run_name"] == "mmdit-tiny"
    assert run.data.tags["mlflow.note.content"] == "The shared tiny run of the tests."
    config = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path)))
    assert yaml.safe_load(config.read_text()) == RunDir(finished_run).saved_config()
    images = [item.path for item in client.list_artifacts(run.info.run_id, "images")]
    assert any(Path(path).name.startswith("grid+step+4+") for path in images), images  # the grid at the last step

    [output] = run.outputs.model_outputs
    assert output.step == 4
    # The model is the run's experiment's, stored beside the run's other artifacts.
    logged = client.get_logged_model(output.model_id)
    assert logged.experiment_id == run.info.experiment_id
    assert logged.artifact_location.startswith(client.get_experiment(run.info.experiment_id).artifact_location)
    [version] = [item for item in client.search_model_versions("name='tiny-mmdit'") if item.run_id == run.info.run_id]
    assert version.source == f"models:/{output.model_id}"
    registered = f"models:/tiny-mmdit/{version.version}"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", info["tracking_uri"])  # where models:/ URIs are looked up
    pyfunc = mlflow.pyfunc.load_model(registered)
    ema = load_model(finished_run)  # the EMA weights of the latest checkpoint
    model = pyfunc.unwrap_python_model().model
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in ema.state_dict().items())
    generator = torch.Generator().manual_seed(0)
    inputs = {"img": torch.randn(2, 1, 32, 32, generator=generator), "t": torch.rand(2, generator=generator),
              "txt": torch.randn(2, 32, 32, generator=generator), "vec": torch.randn(2, 32, generator=generator)}
    with torch.no_grad():
        expected = ema(**inputs)
    assert np.allclose(pyfunc.predict({name: value.numpy() for name, value in inputs.items()}), expected.numpy())

    folder = Path(mlflow.artifacts.download_artifacts(registered, dst_path=str(tmp_path / "m"))) / "artifacts" / "model"
    assert {path.name for path in folder.iterdir()} == {"flowmill_model.json", "model.safetensors", "config.yaml"}
    assert torch.equal(load_model(folder).final.linear.weight, ema.final.linear.weight)


def test_a_model_without_a_model_folder_or_an_ema_is_not_logged_and_says_why(tmp_path: Path, caplog):
    flm = fake_run(tmp_path / "flm", "flm", "flow_lm")
    assert not_loggable(flm) == "a 'flow_lm' model has no flowmill model folder (families: mmdit, autoencoder)"
    no_ema = fake_run(tmp_path / "mmdit", "mmdit", "mmdit")
    assert not_loggable(no_ema) == "the run keeps no EMA (ema.enabled=false)"
    # Nothing reaches the store (there is none: a call would count as a failure).
    tracker = MLflowTracker(None, "run", "0", "sqlite:///nowhere.db", 0, {}, None, retry_after_s=60, max_queued_calls=10)
    with caplog.at_level(logging.INFO, logger="flowmill"):
        tracker.log_model(no_ema, step=1, register_as="never")
    assert tracker.failures == 0
    assert "No MLflow model logged: the run keeps no EMA (ema.enabled=false)." in caplog.messages
