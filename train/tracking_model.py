"""A finished run's EMA model as an MLflow model: logged into its run, registered by name if asked.

The logged model is an MLflow ``pyfunc`` model whose artifact ``model`` is a flowmill model folder
(``flowmill_model.json`` + ``model.safetensors``, what ``flowmill.models.load_model`` reads) with
the run's ``config.yaml`` beside it. The MLflow UI lists it among the run's logged models, and the
model registry accepts it (``tracking.register_as``). To use it::

    model = mlflow.pyfunc.load_model("models:/NAME/1").unwrap_python_model().model   # the nn.Module
    folder = mlflow.artifacts.download_artifacts("models:/NAME/1") + "/artifacts/model"  # flowmill sample FOLDER

``predict`` is one forward pass: a mapping of the model's keyword inputs as arrays (an MMDiT's
``img``, ``t``, ``txt``, ``vec``) to its output as an array.

Only families that have a model folder (``flowmill.models.sd3_convert.CONFIG_CLASSES``) and runs
that keep an EMA are logged; for the others ``not_loggable`` says why.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

import flowmill
from flowmill.models.loading import load_model, load_weights
from flowmill.models.sd3_convert import CONFIG_CLASSES, save_model_folder
from flowmill.run_dir import RunDir
from flowmill.weights import has_ema

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"  # before MLflow is imported (see flowmill.train.tracking)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bars in the training log

import mlflow  # noqa: E402
import mlflow.pyfunc  # noqa: E402
from mlflow.models import Model  # noqa: E402

logger = logging.getLogger("flowmill")

MODEL_NAME = "model"  # the logged model's name, and the name of its flowmill model folder artifact
MODEL_CODE = Path(__file__).with_name("tracking_model_code.py")  # builds the pyfunc when MLflow loads the model


class FlowmillModel(mlflow.pyfunc.PythonModel):
    """The pyfunc face of a flowmill model folder: ``.model`` is the loaded ``nn.Module`` (eval, CPU)."""

    # MLflow reads predict's type hints as an input schema and warns when there are none; a mapping of
    # arrays of any shape has no such schema. MLflow's own ChatModel skips the check the same way.
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        self.model = load_model(context.artifacts[MODEL_NAME])

    def predict(self, context, model_input, params=None):
        """One forward pass: ``{name: array}`` keyword inputs → the output array (or a tuple of arrays)."""
        with torch.no_grad():
            output = self.model(**{name: torch.as_tensor(np.asarray(value)) for name, value in dict(model_input).items()})
        if isinstance(output, tuple):
            return tuple(item.numpy() for item in output)
        return output.numpy()


def not_loggable(run_dir: Path) -> str | None:
    """Why the latest checkpoint of ``run_dir`` cannot be logged as a model, or None if it can."""
    _, checkpoint = RunDir.open(run_dir)
    family = checkpoint.meta.get("family")
    if family not in CONFIG_CLASSES:
        return f"a {family!r} model has no flowmill model folder (families: {', '.join(CONFIG_CLASSES)})"
    if not has_ema(checkpoint):
        return "the run keeps no EMA (ema.enabled=false)"
    return None


def write_model_folder(run_dir: Path, out: Path) -> Path:
    """The EMA weights of ``run_dir``'s latest checkpoint as a model folder ``out``, with the run's config.yaml."""
    family, cfg, state_dict = load_weights(run_dir)
    save_model_folder(out, family, cfg, state_dict)
    shutil.copyfile(RunDir(run_dir).config_file, out / "config.yaml")
    return out


def log_run_model(tracking_uri: str, run_id: str, run_dir: Path, step: int, register_as: str | None) -> str:
    """Log the EMA model of ``run_dir`` into MLflow run ``run_id`` at ``step`` (and register it as
    ``register_as``); returns the logged model's URI (``models:/<model id>``)."""
    mlflow.set_tracking_uri(tracking_uri)  # MLflow's model logging and registry read the global store
    # A logged model belongs to the active experiment (else the Default one, whose artifacts go to
    # ./mlruns of whatever folder the run started in): make it the run's, so the model sits with its run.
    mlflow.set_experiment(experiment_id=mlflow.MlflowClient(tracking_uri).get_run(run_id).info.experiment_id)
    with tempfile.TemporaryDirectory(prefix="flowmill-model-") as tmp:
        folder = write_model_folder(run_dir, Path(tmp) / MODEL_NAME)
        info = Model.log(
            artifact_path=None,
            name=MODEL_NAME,
            flavor=mlflow.pyfunc,
            run_id=run_id,
            step=step,
            python_model=str(MODEL_CODE),
            artifacts={MODEL_NAME: str(folder)},
            pip_requirements=[f"flowmill=={flowmill.__version__}", f"torch=={torch.__version__.split('+')[0]}"],
            registered_model_name=register_as,
        )
    registered = f", registered as {register_as} version {info.registered_model_version}" if register_as else ""
    logger.info("MLflow model %s logged from the EMA weights of step %d%s", info.model_uri, step, registered)
    return info.model_uri
