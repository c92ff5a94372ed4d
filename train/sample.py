"""``flowmill sample`` and ``flowmill reconstruct``: a run's task with its EMA weights, in one
process, without DeepSpeed."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from torch import nn

from flowmill.errors import UsageError
from flowmill.models.loading import load_model, load_vae, load_weights
from flowmill.models.samplers import GUIDANCES
from flowmill.run_dir import Checkpoint, RunDir
from flowmill.train.config import load_config
from flowmill.train.distributed import DistEnv, choose_device
from flowmill.train.model_io import live_weights, model_vae
from flowmill.train.tasks import get_task_class
from flowmill.train.tasks.base import Task
from flowmill.train.tasks.latents import Latents
from flowmill.weights import has_ema, read_ema


def run_task(run_dir: RunDir) -> Task:
    """The task of a run, ready to sample (text encoder, text tokenizer, decoders), without its model."""
    cfg = load_config(None, [], base=run_dir.saved_config())
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=choose_device(cfg.trainer.device))
    return get_task_class(cfg.task)(cfg, env, run_dir)


def load_task_and_model(source: str | Path) -> tuple[Task, nn.Module, Checkpoint]:
    """The task of a run dir (or checkpoint folder) and its model holding the EMA weights (the
    trained ones for a run without EMA), in eval mode."""
    run_dir, checkpoint = RunDir.open(source)
    task = run_task(run_dir)
    model = task.build_model()
    model.load_state_dict(read_ema(checkpoint) if has_ema(checkpoint) else live_weights(checkpoint.path, task.build_model()))
    return task, model.to(task.env.device).eval(), checkpoint


def check_counts(args: argparse.Namespace) -> None:
    for name, value in (("--num-samples", args.num_samples), ("--steps", args.steps)):
        if value < 1:
            raise UsageError(f"{name}: must be at least 1, got {value}")


def check_guidance(args: argparse.Namespace) -> None:
    """Refuse an unknown --guidance and RAAG parameters out of range (--cfg None: not yet known)."""
    if args.guidance not in GUIDANCES:
        raise UsageError(f"--guidance: unknown guidance {args.guidance!r}; choose one of: {', '.join(GUIDANCES)}")
    if not (math.isfinite(args.raag_alpha) and args.raag_alpha >= 0):
        raise UsageError(f"--raag-alpha: RAAG's alpha must be a finite number >= 0, got {args.raag_alpha:g}")
    if args.cfg is not None and args.guidance == "raag" and not (math.isfinite(args.cfg) and args.cfg >= 1):
        raise UsageError(f"--cfg: with --guidance raag it is RAAG's w_max, which must be a finite number >= 1, got {args.cfg:g}")


def sample_run(args: argparse.Namespace) -> int:
    """``flowmill sample RUN_DIR|CKPT``: the run's task writes its own kind of samples (images, text...)."""
    check_counts(args)
    check_guidance(args)
    task, model, checkpoint = load_task_and_model(args.source)
    run_guidance(args, task)
    return task.sample_command(model, checkpoint.path, args)


def run_guidance(args: argparse.Namespace, task: Task) -> None:
    """Fill in an absent --cfg with the run's ``sample.cfg_scale`` (a flow map distilled with guidance
    samples at 1), then check the guidance again."""
    if args.cfg is None:
        args.cfg = task.cfg.sample.cfg_scale
        check_guidance(args)


def sample_model_folder(args: argparse.Namespace) -> int:
    """``flowmill sample MODEL_DIR --text-from RUN_DIR``: the folder's model, the run's text side; the
    folder's own VAE (an imported SD3 pipeline's ``vae/``) decodes its latents, else the run's."""
    if not args.text_from:
        raise UsageError(f"--text-from: {args.source} is a model folder, which holds no text encoder; pass "
                         "--text-from RUN_DIR, a run whose text encoder gives the widths the model takes")
    check_counts(args)
    check_guidance(args)
    task = run_task(RunDir.open(args.text_from)[0])
    run_guidance(args, task)
    family, _, _ = load_weights(args.source)
    if family != task.family:
        raise UsageError(f"--text-from: {args.text_from} trains {task.family!r} models; {args.source} holds a {family!r} one")
    model = load_model(args.source, task.env.device)
    encoder = task.text_encoder
    if (model.config.txt_dim, model.config.vec_dim) != (encoder.txt_dim, encoder.vec_dim):
        raise UsageError(f"--text-from: {args.text_from}'s text encoder gives txt width {encoder.txt_dim} and vec width "
                         f"{encoder.vec_dim}; {args.source} takes txt_dim={model.config.txt_dim}, "
                         f"vec_dim={model.config.vec_dim}")
    vae = model_vae(args.source)
    if vae is not None:
        task.latents = Latents(load_vae(vae)).to(task.env.device)
    return task.sample_command(model, Path(args.source), args)
