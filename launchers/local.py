"""``flowmill launch local`` / ``flowmill resume``: N training processes on this machine.

The config is checked here, before any process starts, so a bad key fails with exit code 2
without starting one. The processes are supervised by torch's elastic agent (what torchrun
uses): if one dies, the others are stopped and the failing rank is reported.
"""

from __future__ import annotations

import argparse
import sys
import uuid

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from flowmill.data.shards import resolve_shards
from flowmill.errors import UsageError
from flowmill.run_dir import RunDir
from flowmill.train.config import Config, load_config, to_dict, validate
from flowmill.train.distributed import choose_device, free_port, placement
from flowmill.train.tasks import get_task_class


def check_before_launch(cfg: Config, run_dir: RunDir, nproc: int, resume: bool) -> None:
    """Everything that can be refused without starting a worker, wherever the workers will run."""
    if nproc < 1:
        raise UsageError(f"--nproc: must be at least 1, got {nproc}")
    validate(cfg, world_size=nproc)
    if get_task_class(cfg.task).reads_data(cfg):
        try:
            resolve_shards(cfg.data.path)
        except (FileNotFoundError, ValueError) as error:
            raise UsageError(f"data.path: {error}") from None
    if resume:
        run_dir.refuse_changed_model(to_dict(cfg))
        run_dir.latest()
    elif run_dir.is_run():
        raise UsageError(f"run.dir: {run_dir} already holds a run; continue it with `flowmill resume {run_dir}`")


def check_devices(cfg: Config) -> None:
    """The devices the config asks for exist on this machine, where the workers will run."""
    try:
        device = choose_device(cfg.trainer.device)
    except RuntimeError as error:
        raise UsageError(str(error)) from None
    placement(cfg.ema.device, device, "ema.device")


def launch_command(args: argparse.Namespace) -> int:
    """``flowmill launch local``: start a new run on ``--nproc`` local processes."""
    cfg = load_config(args.config, args.overrides)
    run_dir = RunDir(cfg.run.dir) if cfg.run.dir else RunDir.default(cfg.run.name)
    check_before_launch(cfg, run_dir, args.nproc, resume=False)
    check_devices(cfg)
    # Every worker must write into the one run dir chosen here (a default one is timestamped).
    return run_workers(["train", args.config, *args.overrides, f"run.dir={run_dir}"], args.nproc, run_dir)


def resume_command(args: argparse.Namespace) -> int:
    """``flowmill resume``: continue a run from its latest checkpoint (by default on its own world size)."""
    run_dir = RunDir(args.run_dir)
    info = run_dir.info()
    cfg = load_config(None, args.overrides, base=run_dir.saved_config())
    nproc = args.nproc or int(info.get("world_size", 1))
    check_before_launch(cfg, run_dir, nproc, resume=True)
    check_devices(cfg)
    return run_workers(["train", "--resume", str(run_dir), *args.overrides], nproc, run_dir)


def mark_failed(run_dir: RunDir) -> None:
    """A worker killed outright cannot record its end; the launcher does it for the run."""
    if run_dir.info_file.is_file() and run_dir.info().get("status") == "running":
        run_dir.update_info(status="failed")


def run_workers(cli_args: list[str], nproc: int, run_dir: RunDir) -> int:
    """Run ``flowmill <cli_args>`` in ``nproc`` supervised processes; returns an exit code."""
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
    )
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "flowmill.cli", *cli_args)
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        message = failure.message if isinstance(failure.message, str) else failure.message.get("message", "")
        first_line = (message or "").strip().splitlines()
        detail = first_line[0] if first_line else f"exit code {failure.exitcode}"
        print(f"flowmill: rank {rank} failed (exit code {failure.exitcode}): {detail}", file=sys.stderr)
        mark_failed(run_dir)
        print(f"flowmill: the job was stopped; run dir: {run_dir}", file=sys.stderr)
        return 2 if failure.exitcode == 2 else 1
    print(f"flowmill: run dir: {run_dir}", file=sys.stderr)
    return 0
