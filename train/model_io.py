"""Models in and out of flowmill: model folders, run dirs and diffusers folders.

- ``load_model(PATH)`` (also ``flowmill.models.load_model``): a flowmill model folder, a run
  dir or one of its ``checkpoints/step-*`` folders → the model in eval mode; a run gives
  its EMA weights.
- ``flowmill import sd3 DIR --out MODEL_DIR``: a diffusers ``SD3Transformer2DModel`` folder →
  a flowmill model folder (``flowmill_model.json`` + ``model.safetensors``).
- ``flowmill export sd3 RUN_DIR|CKPT|MODEL_DIR OUT_DIR [--live]``: → a diffusers folder (a
  run's EMA weights, or with ``--live`` the trained weights of its DeepSpeed checkpoint).
- ``flowmill sample MODEL_DIR --text-from RUN_DIR``: a model folder holds no text encoder,
  so it samples with a run's (tokenizer, text encoder, timestep shift).

Nothing here imports DeepSpeed, MLflow or submitit at module level: ``load_model`` stays
usable where only the models are installed. ``--live`` imports DeepSpeed to merge ZeRO
partitions.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
import yaml
from torch import nn

from flowmill.models.mmdit import MMDiT
from flowmill.models.sd3_convert import (
    CONFIG_CLASSES,
    DIFFUSERS_CONFIG,
    FLOWMILL_CONFIG,
    load_diffusers_folder,
    load_model_folder,
    save_diffusers_folder,
    save_model_folder,
)
from flowmill.train import run_dir as rundir
from flowmill.train.checkpoint import COMPLETE_MARKER, EMA_FILE, latest_checkpoint
from flowmill.errors import UsageError

# Model families that load_model can build, by the name model folders and tasks use.
MODEL_CLASSES: dict[str, type[nn.Module]] = {"mmdit": MMDiT}
# What activation checkpointing (train/engine.py's checkpoint_wrapper) inserts into parameter names.
WRAPPER_PREFIX = "_checkpoint_wrapped_module."
SOURCES = "a flowmill model folder (flowmill_model.json), a run dir or one of its checkpoints/step-* folders"


def user_facing(reader, *args):
    """Call a models-layer folder reader; its ValueError (a folder that is not what it must be) is a UsageError."""
    try:
        return reader(*args)
    except ValueError as error:
        raise UsageError(str(error)) from None


def is_model_folder(path: str | Path) -> bool:
    return (Path(path) / FLOWMILL_CONFIG).is_file()


def resolve_run(path: Path) -> tuple[Path, Path]:
    """A run dir or checkpoint folder → (run dir, complete checkpoint folder)."""
    if rundir.is_run_dir(path):
        return path, latest_checkpoint(path)
    if (path / COMPLETE_MARKER).is_file() and rundir.is_run_dir(path.parent.parent):
        return path.parent.parent, path
    if (path / DIFFUSERS_CONFIG).is_file():
        raise UsageError(f"{path} is a diffusers folder, not a flowmill model: import it first with "
                         f"`flowmill import sd3 {path} --out MODEL_DIR`")
    raise UsageError(f"{path} is not {SOURCES}")


def run_model_config(run_dir: Path):
    """(family, architecture config) of the model a run trains, from its config.yaml."""
    from flowmill.train.tasks import get_task_class

    saved = yaml.safe_load((run_dir / rundir.CONFIG_YAML).read_text())
    try:
        family = get_task_class(saved["task"]).family
    except KeyError as error:
        raise UsageError(f"{run_dir}: {error.args[0]}") from None
    if family not in CONFIG_CLASSES:
        raise UsageError(f"{run_dir} trains a {family!r} model; model files are supported for: {', '.join(CONFIG_CLASSES)}")
    config_class = CONFIG_CLASSES[family]
    names = {field.name for field in dataclasses.fields(config_class)}
    # The run's model section also holds how it was built (init_from, compile), not the architecture.
    return family, config_class(**{key: value for key, value in saved["model"].items() if key in names})


def _unwrapped(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name.replace(WRAPPER_PREFIX, ""): tensor.float() for name, tensor in state_dict.items()}


def live_weights(checkpoint: Path, family: str, cfg) -> dict[str, torch.Tensor]:
    """The trained (non-EMA) weights in a DeepSpeed checkpoint folder, in fp32.

    Pipeline runs store one file per layer; ZeRO runs hold fp32 master weights in their
    optimizer partitions (merged by DeepSpeed's zero_to_fp32); otherwise the model states
    file holds the whole model.
    """
    layer_files = sorted(checkpoint.glob("layer_*-model_states.pt"))
    if layer_files:
        model = MODEL_CLASSES[family](cfg)
        layers = model.pipeline_layers()  # they share the model's tensors: loading a layer fills the model
        for path in layer_files:
            index = int(path.name.split("-")[0].removeprefix("layer_"))
            layers[index].load_state_dict(torch.load(path, map_location="cpu", weights_only=False))
        return {name: tensor.float() for name, tensor in model.state_dict().items()}
    if any(checkpoint.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return _unwrapped(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name))
    states = checkpoint / "mp_rank_00_model_states.pt"
    if not states.is_file():
        raise UsageError(f"{checkpoint} has no DeepSpeed model states (mp_rank_00_model_states.pt or layer_*-model_states.pt)")
    return _unwrapped(torch.load(states, map_location="cpu", weights_only=False)["module"])


def load_weights(path: str | Path, live: bool = False):
    """(family, architecture config, state dict) of a model folder, or of a run (EMA weights,
    or the trained weights with ``live``). UsageError says what ``path`` is not."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path} does not exist; pass {SOURCES}")
    if is_model_folder(path):
        if live:
            raise UsageError(f"{path} is a model folder, which holds one set of weights; --live reads a run's checkpoint")
        return user_facing(load_model_folder, path)
    run_dir, checkpoint = resolve_run(path)
    family, cfg = run_model_config(run_dir)
    if live:
        return family, cfg, live_weights(checkpoint, family, cfg)
    from safetensors.torch import load_file

    return family, cfg, load_file(checkpoint / EMA_FILE)


def load_model(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """A model folder or run dir (its latest checkpoint's EMA weights) → the model in eval mode.

    An MMDiT is then called as ``model(img, t, txt, vec)`` (see flowmill.models.mmdit).
    """
    family, cfg, state_dict = load_weights(path)
    model = MODEL_CLASSES[family](cfg)
    model.load_state_dict(state_dict)
    return model.to(device).eval()


def _fresh_folder(path: Path) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(f"{path} exists and is not an empty folder; choose a new output folder")


def import_sd3(diffusers_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a diffusers SD3 transformer folder as a flowmill model folder; returns it."""
    source, out = Path(diffusers_dir), Path(out_dir)
    if (source / "model_index.json").is_file():
        raise UsageError(f"{source} is a whole diffusers pipeline; pass its transformer folder, {source / 'transformer'}")
    if not source.is_dir():
        raise UsageError(f"{source} is not a folder; pass a diffusers SD3Transformer2DModel folder")
    cfg, state_dict = user_facing(load_diffusers_folder, source)
    _fresh_folder(out)
    save_model_folder(out, "mmdit", cfg, state_dict)
    return out


def export_sd3(source: str | Path, out_dir: str | Path, live: bool = False) -> Path:
    """Write an MMDiT (model folder, or a run's EMA or ``live`` weights) as a diffusers SD3 folder."""
    family, cfg, state_dict = load_weights(source, live)
    if family != "mmdit":
        raise UsageError(f"{source} holds a {family!r} model; `export sd3` writes MMDiTs only")
    out = Path(out_dir)
    _fresh_folder(out)
    save_diffusers_folder(out, cfg, state_dict)
    return out


def load_run_task(source: str | Path):
    """The task of a run (its text encoder and tokenizer ready), without its model."""
    from flowmill.train.config import load_config
    from flowmill.train.distributed import DistEnv, choose_device
    from flowmill.train.tasks import get_task_class

    run_dir, _ = resolve_run(Path(source))
    cfg = load_config(None, [], base=yaml.safe_load((run_dir / rundir.CONFIG_YAML).read_text()))
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=choose_device(cfg.trainer.device))
    return get_task_class(cfg.task)(cfg, env, run_dir)


def sample_model_folder(args: argparse.Namespace) -> int:
    """``flowmill sample MODEL_DIR --text-from RUN_DIR``: the folder's model, the run's text side."""
    from flowmill.train.config import UsageError

    if not args.text_from:
        raise UsageError(f"--text-from: {args.source} is a model folder, which holds no text encoder; pass "
                          "--text-from RUN_DIR, a run whose text encoder gives the widths the model takes")
    for name, value in (("--num-samples", args.num_samples), ("--steps", args.steps)):
        if value < 1:
            raise UsageError(f"{name}: must be at least 1, got {value}")
    task = load_run_task(args.text_from)
    family, _, _ = load_weights(args.source)
    if family != task.family:
        raise UsageError(f"--text-from: {args.text_from} trains {task.family!r} models; {args.source} holds a {family!r} one")
    model = load_model(args.source, task.env.device)
    encoder = task.text_encoder
    if (model.config.txt_dim, model.config.vec_dim) != (encoder.txt_dim, encoder.vec_dim):
        raise UsageError(f"--text-from: {args.text_from}'s text encoder gives txt width {encoder.txt_dim} and vec width "
                          f"{encoder.vec_dim}; {args.source} takes txt_dim={model.config.txt_dim}, "
                          f"vec_dim={model.config.vec_dim}")
    return task.sample_command(model, Path(args.source), args)
