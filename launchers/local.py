"""``flowmill launch local`` / ``flowmill resume``: N training processes on this machine.

The config is checked here, before any process starts, so a bad key fails in a second
with exit code 2. The processes are supervised by torch's elastic agent (what torchrun
uses): if one dies, the others are stopped and the failing rank is reported.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path

import yaml
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from flowmill.data.loader import resolve_shards
from flowmill.errors import UsageError
from flowmill.train import run_dir as rundir
from flowmill.train.checkpoint import latest_checkpoint
from flowmill.train.config import Config, load_config, validate
from flowmill.train.distributed import free_port


def check_before_launch(cfg: Config, nproc: int, resume: bool) -> None:
    """Everything that can be refused without starting a worker."""
    if nproc < 1:
        raise UsageError(f"--nproc: must be at least 1, got {nproc}")
    validate(cfg, world_size=nproc)
    try:
        resolve_shards(cfg.data.path)
    except (FileNotFoundError, ValueError) as error:  # no manifest, no shards, missing shards
        raise UsageError(f"data.path: {error}") from None
    run_dir = Path(cfg.run.dir)
    if resume:
        rundir.check_resumable(run_dir, cfg)
        latest_checkpoint(run_dir)
    elif rundir.is_run_dir(run_dir):
        raise UsageError(f"run.dir: {run_dir} already holds a run; continue it with `flowmill resume {run_dir}`")


def launch_local(config_path: str, overrides: list[str], nproc: int) -> int:
    """Start a new run on ``nproc`` local processes."""
    cfg = load_config(config_path, overrides)
    run_dir = cfg.run.dir or str(rundir.default_run_dir(cfg.run.name))
    overrides = [*overrides, f"run.dir={run_dir}"]
    check_before_launch(load_config(config_path, overrides), nproc, resume=False)
    return run_workers(["train", config_path, *overrides], nproc, run_dir)


def launch_command(args: argparse.Namespace) -> int:
    """``flowmill launch local``."""
    return launch_local(args.config, args.overrides, args.nproc)


def resume_command(args: argparse.Namespace) -> int:
    """``flowmill resume``."""
    return resume_local(args.run_dir, args.overrides, args.nproc)


def resume_local(run_dir: str, overrides: list[str], nproc: int | None) -> int:
    """Continue ``run_dir`` from its latest checkpoint."""
    info = rundir.read_run_json(Path(run_dir))
    base = yaml.safe_load((Path(run_dir) / rundir.CONFIG_YAML).read_text())
    cfg = load_config(None, [*overrides, f"run.dir={run_dir}"], base=base)
    nproc = nproc or int(info.get("world_size", 1))
    check_before_launch(cfg, nproc, resume=True)
    return run_workers(["train", "--resume", str(run_dir), *overrides], nproc, run_dir)


def mark_failed(run_dir: Path) -> None:
    """A worker killed outright cannot record its end; the launcher does it for the run."""
    if (run_dir / rundir.RUN_JSON).is_file() and rundir.read_run_json(run_dir).get("status") == "running":
        rundir.update_run_json(run_dir, status="failed")


def run_workers(cli_args: list[str], nproc: int, run_dir: str) -> int:
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
        mark_failed(Path(run_dir))
        print(f"flowmill: the job was stopped; run dir: {run_dir}", file=sys.stderr)
        return 2 if failure.exitcode == 2 else 1
    print(f"flowmill: run dir: {run_dir}", file=sys.stderr)
    return 0
