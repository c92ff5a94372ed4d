"""``flowmill sample``: images from a run's EMA weights, without DeepSpeed."""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from flowmill.train import run_dir as rundir
from flowmill.train.checkpoint import COMPLETE_MARKER, EMA_FILE, latest_checkpoint
from flowmill.train.config import load_config
from flowmill.train.distributed import DistEnv, choose_device
from flowmill.train.tasks import get_task_class
from flowmill.errors import UsageError


def resolve_checkpoint(source: Path) -> tuple[Path, Path]:
    """RUN_DIR or RUN_DIR/checkpoints/step-N → (run_dir, checkpoint dir)."""
    if rundir.is_run_dir(source):
        return source, latest_checkpoint(source)
    if (source / COMPLETE_MARKER).is_file() and rundir.is_run_dir(source.parent.parent):
        return source.parent.parent, source
    raise UsageError(f"{source} is neither a flowmill run dir nor a complete checkpoint folder (checkpoints/step-*)")


def load_task_and_model(source: Path):
    """The run's task and its model holding the EMA weights, in eval mode."""
    from safetensors.torch import load_file

    run_dir, checkpoint = resolve_checkpoint(Path(source))
    cfg = load_config(None, [], base=yaml.safe_load((run_dir / rundir.CONFIG_YAML).read_text()))
    env = DistEnv(rank=0, local_rank=0, world_size=1, device=choose_device(cfg.trainer.device))
    task = get_task_class(cfg.task)(cfg, env, run_dir)
    model = task.build_model()
    model.load_state_dict(load_file(checkpoint / EMA_FILE))
    return task, model.to(env.device).eval(), checkpoint


def sample_run(args: argparse.Namespace) -> int:
    """``flowmill sample``: the run's task writes its own kind of samples (images, text...)."""
    for name, value in (("--num-samples", args.num_samples), ("--steps", args.steps)):
        if value < 1:
            raise UsageError(f"{name}: must be at least 1, got {value}")
    task, model, checkpoint = load_task_and_model(Path(args.source))
    return task.sample_command(model, checkpoint, args)
