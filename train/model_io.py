"""Weights in and out of flowmill: diffusers folders and the trained weights of a run.

- ``flowmill import sd3 DIR --out MODEL_DIR``: a diffusers ``SD3Transformer2DModel`` folder →
  a flowmill model folder (``flowmill_model.json`` + ``model.safetensors``); a whole SD3 pipeline
  folder (``model_index.json``, ``transformer/``, ``vae/``) also brings its VAE, copied as the
  diffusers folder ``MODEL_DIR/vae``, through which ``flowmill sample`` decodes.
- ``flowmill export sd3 RUN_DIR|CKPT|MODEL_DIR OUT_DIR [--live]``: → a diffusers folder (a
  run's EMA weights, or with ``--live`` the trained weights of its DeepSpeed checkpoint, whose
  ZeRO partitions DeepSpeed merges).

Loading a model for use is ``flowmill.models.load_model``, which needs none of this.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from flowmill.errors import UsageError
from flowmill.models import loading
from flowmill.models.loading import MODEL_CLASSES, SOURCES, is_model_folder, load_vae, open_run, run_model_config
from flowmill.models.sd3_convert import load_diffusers_folder, save_diffusers_folder, save_model_folder
from flowmill.models.vae import DIFFUSERS_CONFIG, DIFFUSERS_WEIGHTS
from flowmill.train.engine import unwrapped_name

VAE_FOLDER = "vae"  # an SD3 pipeline's VAE folder, kept under this name in an imported model folder


def _unwrapped(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {unwrapped_name(name): tensor.float() for name, tensor in state_dict.items()}


def live_weights(checkpoint: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained (non-EMA) weights in a DeepSpeed checkpoint folder, in fp32, as ``model``'s state dict.

    Pipeline runs store one file per layer (loaded into ``model``, a fresh instance); ZeRO runs
    hold fp32 master weights in their optimizer partitions (merged by DeepSpeed's zero_to_fp32);
    otherwise the model states file holds the whole model.
    """
    layer_files = sorted(checkpoint.glob("layer_*-model_states.pt"))
    if layer_files:
        layers = model.pipeline_layers()  # they share the model's tensors: loading a layer fills the model
        for path in layer_files:
            index = int(path.name.split("-")[0].removeprefix("layer_"))
            layers[index].load_state_dict(torch.load(path, map_location="cpu", weights_only=False))
        return {name: tensor.float() for name, tensor in model.state_dict().items()}
    if any(checkpoint.glob("*zero_pp_rank_*optim_states.pt")):
        # Deliberately lazy (start-up time): only the trained weights of a ZeRO run need DeepSpeed.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return _unwrapped(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name))
    states = checkpoint / "mp_rank_00_model_states.pt"
    if not states.is_file():
        raise UsageError(f"{checkpoint} has no DeepSpeed model states (mp_rank_00_model_states.pt or layer_*-model_states.pt)")
    return _unwrapped(torch.load(states, map_location="cpu", weights_only=False)["module"])


def load_weights(path: str | Path, live: bool = False) -> tuple[str, object, dict[str, torch.Tensor]]:
    """(family, architecture config, state dict) of a model folder, or of a run (EMA weights,
    or the trained weights with ``live``). UsageError says what ``path`` is not."""
    if not live:
        return loading.load_weights(path)
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path} does not exist; pass {SOURCES}")
    if is_model_folder(path):
        raise UsageError(f"{path} is a model folder, which holds one set of weights; --live reads a run's checkpoint")
    run_dir, checkpoint = open_run(path)
    family, cfg = run_model_config(run_dir, checkpoint)
    return family, cfg, live_weights(checkpoint.path, MODEL_CLASSES[family](cfg))


def _fresh_folder(path: Path) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(f"{path} exists and is not an empty folder; choose a new output folder")


def model_vae(folder: str | Path) -> Path | None:
    """The VAE a model folder keeps (an imported SD3 pipeline's), or None."""
    vae = Path(folder) / VAE_FOLDER
    return vae if vae.is_dir() else None


def import_sd3(diffusers_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a diffusers SD3 transformer folder, or a whole SD3 pipeline folder (its transformer and
    VAE), as a flowmill model folder; returns it."""
    source, out = Path(diffusers_dir), Path(out_dir)
    vae = None
    if (source / "model_index.json").is_file():
        for part in ("transformer", VAE_FOLDER):
            if not (source / part).is_dir():
                raise UsageError(f"{source / part} does not exist; an SD3 pipeline folder holds transformer/ and vae/")
        vae, source = source / VAE_FOLDER, source / "transformer"
        load_vae(vae)  # refuses a VAE folder without config.json or weights before anything is written
    if not source.is_dir():
        raise UsageError(f"{source} is not a folder; pass a diffusers SD3Transformer2DModel folder")
    try:
        cfg, state_dict = load_diffusers_folder(source)
    except ValueError as error:
        raise UsageError(str(error)) from None
    _fresh_folder(out)
    save_model_folder(out, "mmdit", cfg, state_dict)
    if vae is not None:
        (out / VAE_FOLDER).mkdir()
        for name in (DIFFUSERS_CONFIG, DIFFUSERS_WEIGHTS):
            shutil.copyfile(vae / name, out / VAE_FOLDER / name)
    return out


def export_sd3(source: str | Path, out_dir: str | Path, live: bool = False) -> Path:
    """Write an MMDiT (model folder, or a run's EMA or ``live`` weights) as a diffusers SD3 folder."""
    family, cfg, state_dict = load_weights(source, live)
    if family != "mmdit":
        raise UsageError(f"{source} holds a {family!r} model; `export sd3` writes MMDiTs only")
    if cfg.flow_map:
        raise UsageError(f"{source} is a flow map (model.flow_map: true), whose end-time input SD3 has no place for; "
                         "`export sd3` writes velocity MMDiTs only")
    out = Path(out_dir)
    _fresh_folder(out)
    save_diffusers_folder(out, cfg, state_dict)
    return out
