"""Handlers of ``flowmill train``, ``sample``, ``reconstruct``, ``import`` and ``export``
(parsers in ``flowmill.train.cli``). Each returns the exit code; a UsageError reaches the CLI."""

from __future__ import annotations

import argparse
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from flowmill.errors import UsageError
from flowmill.train import model_io
from flowmill.train.loop import run_from_cli
from flowmill.train.sample import load_task_and_model, sample_run


@record  # a worker's error reaches the launcher that started it (torch elastic's error file)
def train(args: argparse.Namespace) -> int:
    config, overrides = args.config, args.overrides
    if args.resume and config:
        # argparse hands the first override to the optional CONFIG positional.
        if "=" not in config:
            raise UsageError(f"--resume continues with the run's own config.yaml; drop {config}")
        config, overrides = None, [config, *overrides]
    if not config and not args.resume:
        raise UsageError("pass a CONFIG file (or --resume RUN_DIR)")
    run_from_cli(config, overrides, args.resume)
    return 0


def sample(args: argparse.Namespace) -> int:
    if model_io.is_model_folder(args.source):
        return model_io.sample_model_folder(args)
    if args.text_from:
        raise UsageError("--text-from: only a model folder needs it; a run samples with its own text encoder")
    return sample_run(args)


def reconstruct(args: argparse.Namespace) -> int:
    task, model, checkpoint = load_task_and_model(Path(args.source))
    if not hasattr(task, "reconstruct_command"):
        raise UsageError(f"{args.source} trains a {task.family!r} model; reconstruct needs a video tokenizer run")
    return task.reconstruct_command(model, checkpoint, args)


def import_sd3(args: argparse.Namespace) -> int:
    print(f"wrote {model_io.import_sd3(args.source, args.out)}")
    return 0


def export_sd3(args: argparse.Namespace) -> int:
    print(f"wrote {model_io.export_sd3(args.source, args.out, args.live)}")
    return 0
