"""``flowmill launch local`` / ``flowmill resume``: N training processes on this machine.

The config is checked here, before any process starts, so a bad key fails with exit code 2
without starting one. The processes are supervised by torch's elastic agent (what torchrun
uses): if one dies, the others are stopped and the failing rank is reported. Everything the
job listens on is on 127.0.0.1: the rendezvous and the workers' store (``LoopbackRendezvous``)
and the workers' gloo connections (GLOO_SOCKET_IFNAME, unless set already).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import uuid

from torch.distributed import TCPStore
from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.elastic.rendezvous import RendezvousParameters, rendezvous_handler_registry
from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from flowmill.errors import UsageError, one_line
from flowmill.run_dir import RunDir
from flowmill.train.config import Config, check_data_source, load_config, to_dict, validate
from flowmill.train.distributed import LOOPBACK, choose_device, free_port, loopback_interface, loopback_store, placement
from flowmill.train.signals import PARENT_PID_ENV

LOOPBACK_RENDEZVOUS = "flowmill-loopback"  # the rendezvous backend run_workers registers with torch elastic


def check_before_launch(cfg: Config, run_dir: RunDir, nproc: int, resume: bool) -> None:
    """Everything that can be refused without starting a worker, wherever the workers will run."""
    if nproc < 1:
        raise UsageError(f"--nproc: must be at least 1, got {nproc}")
    validate(cfg, world_size=nproc)
    check_data_source(cfg)
    if resume:
        run_dir.refuse_changed_model(to_dict(cfg))
        if not run_dir.failed_start():  # a run that stopped before its first checkpoint starts again
            run_dir.latest()
    elif run_dir.is_run() and not run_dir.failed_start():
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
    # A run that stopped before it wrote run.json has only its config: it starts again, on one process unless told.
    info = {} if run_dir.failed_start() and not run_dir.info_file.is_file() else run_dir.info()
    cfg = load_config(None, args.overrides, base=run_dir.saved_config())
    nproc = args.nproc or int(info.get("world_size", 1))
    check_before_launch(cfg, run_dir, nproc, resume=True)
    check_devices(cfg)
    return run_workers(["train", "--resume", str(run_dir), *args.overrides], nproc, run_dir)


class LoopbackRendezvous(DynamicRendezvousHandler):
    """torch elastic's c10d rendezvous for the processes of one machine, its two stores (the
    rendezvous's and the one the workers share for their process group) on loopback only:
    torch's own listen on every interface, unauthenticated."""

    def _create_tcp_store_server(self, master_addr: str, master_port: int) -> TCPStore:
        return loopback_store(master_port)

    def get_backend(self) -> str:
        return LOOPBACK_RENDEZVOUS


def loopback_rendezvous(params: RendezvousParameters) -> LoopbackRendezvous:
    """The rendezvous of ``flowmill launch local``, on the port of ``params.endpoint`` at 127.0.0.1."""
    store = loopback_store(int(params.endpoint.rsplit(":", 1)[1]))
    return LoopbackRendezvous.from_backend(params.run_id, store, C10dRendezvousBackend(store, params.run_id),
                                           params.min_nodes, params.max_nodes, local_addr=LOOPBACK)


def mark_failed(run_dir: RunDir, status: str = "failed") -> None:
    """A worker killed outright cannot record its end; the launcher does it for the run. A rank
    failed: the ranks the agent then stopped said ``killed``, but the run ``failed``, in run.json
    and in MLflow."""
    try:
        if not (run_dir.info_file.is_file() and run_dir.info().get("status") in ("running", "killed")):
            return
        run_dir.update_info(status=status)
    except OSError as error:  # a full disk may be what ended the run
        print(f"flowmill: could not record status {status} in {run_dir.info_file}: {error}", file=sys.stderr)
        return
    if status == "failed":
        # Deliberately lazy: MLflow's import costs seconds that a launcher whose job went well never pays.
        from flowmill.train.tracking import end_run

        if not end_run(run_dir, "FAILED") and run_dir.undelivered_file.is_file():
            print(f"flowmill: MLflow did not take the run's status FAILED; send it with: flowmill runs sync {run_dir}",
                  file=sys.stderr)


def run_workers(cli_args: list[str], nproc: int, run_dir: RunDir) -> int:
    """Run ``flowmill <cli_args>`` in ``nproc`` supervised processes; returns an exit code."""
    rendezvous_handler_registry.register(LOOPBACK_RENDEZVOUS, loopback_rendezvous)
    interface = loopback_interface()
    if interface and "GLOO_SOCKET_IFNAME" not in os.environ:
        # The workers' gloo connections: by default on the address the host name resolves to, often a public one.
        os.environ["GLOO_SOCKET_IFNAME"] = interface
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=uuid.uuid4().hex,
        rdzv_backend=LOOPBACK_RENDEZVOUS,
        rdzv_endpoint=f"{LOOPBACK}:{free_port()}",
        local_addr=LOOPBACK,
        max_restarts=0,
        monitor_interval=0.5,
        start_method="spawn",
    )
    os.environ[PARENT_PID_ENV] = str(os.getpid())  # the workers stop when this process is gone
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "flowmill.cli", *cli_args)
    except SignalException as stop:  # the agent stopped the workers, which recorded the run as killed
        name = signal.Signals(stop.sigval).name
        mark_failed(run_dir, "killed")
        print(f"flowmill: stopped by {name}; the workers were stopped; run dir: {run_dir}", file=sys.stderr)
        return 128 + stop.sigval
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        message = failure.message if isinstance(failure.message, str) else failure.message.get("message", "")
        detail = one_line(message or "") or f"exit code {failure.exitcode}"
        print(f"flowmill: rank {rank} failed (exit code {failure.exitcode}): {detail}", file=sys.stderr)
        mark_failed(run_dir)
        print(f"flowmill: the job was stopped; run dir: {run_dir}", file=sys.stderr)
        return 2 if failure.exitcode == 2 else 1
    print(f"flowmill: run dir: {run_dir}", file=sys.stderr)
    return 0
