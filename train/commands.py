"""Handlers of ``flowmill train``, ``sample``, ``reconstruct``, ``import`` and ``export``
(parsers in ``flowmill.train.cli``). Each returns the exit code; a UsageError reaches the CLI."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch
from torch.distributed.elastic.multiprocessing.errors import ErrorHandler, record

from flowmill.errors import UsageError
from flowmill.models.loading import is_model_folder
from flowmill.train import model_io
from flowmill.train.config import load_config
from flowmill.train.job import traceback_file
from flowmill.train.judge import judge_dir, load_or_train_judge
from flowmill.train.loop import run_from_cli
from flowmill.train.sample import load_task_and_model, sample_model_folder, sample_run
from flowmill.train.signals import Stopped, stopping_on_signals


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
    try:
        with stopping_on_signals():
            run_from_cli(config, overrides, args.resume)
    except Stopped as stop:  # the run recorded its end (killed); one line, no traceback
        print(f"[flowmill rank {os.environ.get('RANK', '0')}] stopped: {stop.reason}", file=sys.stderr, flush=True)
        return 128 + stop.signum
    except UsageError:
        raise  # bad input: one line and exit code 2 from the CLI
    except Exception as error:
        if traceback_file(error) is None:
            raise  # the traceback has nowhere else to go
        # The run said why in one line and put the traceback into its log; a launcher that started
        # this process names the failing rank from this error file.
        ErrorHandler().record_exception(error)
        return 1
    return 0


def sample(args: argparse.Namespace) -> int:
    if is_model_folder(args.source):
        return sample_model_folder(args)
    if args.text_from:
        raise UsageError("--text-from: only a model folder needs it; a run samples with its own text encoder")
    return sample_run(args)


def reconstruct(args: argparse.Namespace) -> int:
    task, model, checkpoint = load_task_and_model(args.source)
    if not hasattr(task, "reconstruct_command"):
        raise UsageError(f"{args.source} trains a {task.family!r} model; reconstruct needs a video tokenizer run "
                         "or an autoencoder run")
    return task.reconstruct_command(model, checkpoint.path, args)


def import_sd3(args: argparse.Namespace) -> int:
    print(f"wrote {model_io.import_sd3(args.source, args.out)}")
    return 0


def export_sd3(args: argparse.Namespace) -> int:
    print(f"wrote {model_io.export_sd3(args.source, args.out, args.live)}")
    return 0


def judge(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if not hasattr(cfg, "judge"):
        raise UsageError(f"{args.config}: task {cfg.task} has no judge section; give an flm or fmlm config")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(cfg.trainer.num_threads or torch.get_num_threads())
    _, record = load_or_train_judge(cfg.data.path, cfg.judge, val_path=cfg.eval.path, storage=cfg.data.storage())
    print(json.dumps(record, indent=1))
    print(f"judge: {judge_dir(cfg.data.path, cfg.judge, cfg.data.storage())}")
    return 0
