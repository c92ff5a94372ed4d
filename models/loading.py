"""A trained model, ready to use: ``load_model(PATH)``.

``PATH`` is a flowmill model folder (``flowmill_model.json`` + ``model.safetensors``), a run dir
(its latest checkpoint's EMA weights) or one of a run's ``checkpoints/step-*`` folders. Nothing
here imports DeepSpeed, MLflow or submitit: a run dir is read through ``flowmill.run_dir``,
which only reads files.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from flowmill.errors import UsageError
from flowmill.models.mmdit import MMDiT
from flowmill.models.sd3_convert import CONFIG_CLASSES, DIFFUSERS_CONFIG, FLOWMILL_CONFIG, load_model_folder
from flowmill.models.vae import Autoencoder, LatentSpace, is_diffusers_vae, load_diffusers_vae, vae_from_weights
from flowmill.run_dir import Checkpoint, RunDir
from flowmill.weights import read_ema

# Model families that load_model can build, by the name model folders and checkpoints record.
MODEL_CLASSES: dict[str, type[nn.Module]] = {"mmdit": MMDiT, "autoencoder": Autoencoder}
SOURCES = "a flowmill model folder (flowmill_model.json), a run dir or one of its checkpoints/step-* folders"


def is_model_folder(path: str | Path) -> bool:
    return (Path(path) / FLOWMILL_CONFIG).is_file()


def open_run(path: Path) -> tuple[RunDir, Checkpoint]:
    """A run dir or checkpoint folder; UsageError saying what ``path`` is instead."""
    if (path / DIFFUSERS_CONFIG).is_file():
        raise UsageError(f"{path} is a diffusers folder, not a flowmill model: import it first with "
                         f"`flowmill import sd3 {path} --out MODEL_DIR`")
    try:
        return RunDir.open(path)
    except UsageError:
        raise UsageError(f"{path} is not {SOURCES}") from None


def run_model_config(run_dir: RunDir, checkpoint: Checkpoint) -> tuple[str, object]:
    """(family, architecture config) of the model a run's checkpoint holds."""
    family = checkpoint.meta.get("family")
    if family not in CONFIG_CLASSES:
        raise UsageError(f"{run_dir} trains a {family!r} model; model files are supported for: {', '.join(CONFIG_CLASSES)}")
    config_class = CONFIG_CLASSES[family]
    names = {field.name for field in dataclasses.fields(config_class)}
    # The run's model section also holds how it was built (size, init_from, compile), not the architecture.
    return family, config_class(**{key: value for key, value in run_dir.saved_config()["model"].items() if key in names})


def load_weights(path: str | Path) -> tuple[str, object, dict[str, torch.Tensor]]:
    """(family, architecture config, state dict) of a model folder, or of a run's EMA weights."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path} does not exist; pass {SOURCES}")
    if is_model_folder(path):
        try:
            return load_model_folder(path)
        except ValueError as error:
            raise UsageError(str(error)) from None
    run_dir, checkpoint = open_run(path)
    family, cfg = run_model_config(run_dir, checkpoint)
    return family, cfg, read_ema(checkpoint)


def load_model(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """A model folder or run dir (its latest checkpoint's EMA weights) → the model in eval mode.

    An MMDiT is then called as ``model(img, t, txt, vec)`` (see flowmill.models.mmdit).
    """
    family, cfg, state_dict = load_weights(path)
    model = MODEL_CLASSES[family](cfg)
    model.load_state_dict(state_dict)
    return model.to(device).eval()


def load_vae(path: str | Path) -> LatentSpace:
    """A VAE: a diffusers AutoencoderKL folder, or a flowmill autoencoder run (its EMA weights) or model folder."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path} does not exist; a VAE is a diffusers AutoencoderKL folder or a flowmill autoencoder run")
    if is_diffusers_vae(path):
        return load_diffusers_vae(path)
    if is_model_folder(path):
        family, cfg, state_dict = load_weights(path)
    else:
        if not (RunDir(path).is_run() or Checkpoint.is_complete(path)):
            return load_diffusers_vae(path)  # neither: the error names the missing config.json
        _, checkpoint = RunDir.open(path)
        family = checkpoint.meta.get("family")  # checked before any weights are read
        if family == "autoencoder":
            family, cfg, state_dict = load_weights(path)
    if family != "autoencoder":
        raise UsageError(f"{path} holds a {family!r} model, not an autoencoder; a VAE is a diffusers AutoencoderKL "
                         "folder or a flowmill `task: autoencoder` run")
    return vae_from_weights(cfg, state_dict, str(path))
