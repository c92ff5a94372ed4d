"""Parsers of the commands that start training processes: ``launch local``, ``launch slurm``
and ``resume``. Handlers: ``flowmill.launchers.local`` and ``flowmill.launchers.slurm_submit``."""

from __future__ import annotations

import argparse

from flowmill.arguments import EXAMPLE_RUN, add_config, add_overrides, set_handler

SLURM_EXAMPLES = f"""examples:
  flowmill launch slurm configs/mmdit_digits.yaml --partition gpu --nodes 2 --tasks-per-node 8 --gpus-per-node 8 --time 240
  flowmill launch slurm configs/mmdit_digits.yaml --sweep optim.lr=1e-4,3e-4 --sweep model.depth=4,8
  flowmill launch slurm --resume {EXAMPLE_RUN} trainer.max_steps=4000
  flowmill runs logs {EXAMPLE_RUN} --rank 1
"""


def register(commands: argparse._SubParsersAction) -> None:
    launch = commands.add_parser("launch", help="start a multi-process job", description="Start a training job on several processes.")
    where = launch.add_subparsers(dest="where", required=True, metavar="WHERE")
    _add_local(where)
    _add_slurm(where)
    _add_resume(commands)


def _add_local(where: argparse._SubParsersAction) -> None:
    local = where.add_parser(
        "local",
        help="N processes on this machine",
        description="Start N training processes on this machine (gloo on the CPU, nccl on GPUs). "
        "If one process dies, the whole job stops and the failing rank is reported.",
    )
    local.add_argument("--nproc", type=int, default=1, help="number of processes (default 1)")
    add_config(local)
    set_handler(local, "flowmill.launchers.local:launch_command")


def _add_resume(commands: argparse._SubParsersAction) -> None:
    resume = commands.add_parser(
        "resume",
        help="continue a run from its latest checkpoint",
        description="Continue RUN_DIR from its latest checkpoint with the run's own config.yaml plus overrides "
        "(e.g. trainer.max_steps=40 extends it). The MLflow run is continued.",
    )
    resume.add_argument("run_dir", metavar="RUN_DIR", help="a run directory created by flowmill")
    resume.add_argument("--nproc", type=int, default=None, help="number of local processes (default: the run's world size)")
    add_overrides(resume)
    set_handler(resume, "flowmill.launchers.local:resume_command")


def _add_slurm(where: argparse._SubParsersAction) -> None:
    parser = where.add_parser(
        "slurm",
        help="a SLURM job through submitit: nodes x tasks, checkpoint and requeue on preemption",
        description="Submit the run described by CONFIG (or continue RUN_DIR with --resume) as one SLURM job of "
        "NODES x TASKS_PER_NODE training processes. Every option can also live in the config under "
        "launcher.slurm.*; the flags override it. On preemption or near the time limit the job checkpoints and "
        "requeues itself; a crash is retried launcher.slurm.max_retries times. With --sweep, the cartesian "
        "product of the values is submitted as one job array, one run dir and MLflow run per element.",
        epilog=SLURM_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config(parser, optional=True)
    parser.add_argument("--resume", metavar="RUN_DIR", help="resubmit a stopped run; it continues from its latest checkpoint")
    parser.add_argument("--partition", help="SLURM partition (launcher.slurm.partition; default: the cluster's default)")
    parser.add_argument("--nodes", type=int, help="nodes (launcher.slurm.nodes, default 1)")
    parser.add_argument("--tasks-per-node", type=int, help="training processes per node, one per GPU (default 1)")
    parser.add_argument("--time", type=int, metavar="MIN", help="time limit of one attempt in minutes (default 60)")
    parser.add_argument("--account", help="sbatch --account")
    parser.add_argument("--qos", help="sbatch --qos")
    parser.add_argument("--constraint", help="sbatch --constraint")
    parser.add_argument("--mem", help="memory per node in sbatch syntax, e.g. 64G")
    parser.add_argument("--cpus-per-task", type=int, help="CPU cores per process")
    parser.add_argument("--gpus-per-node", type=int, help="GPUs per node (default 0)")
    parser.add_argument(
        "--slurm-extra", action="append", default=[], metavar="KEY=VALUE",
        help="another sbatch option, e.g. reservation=r1 or exclusive (repeat for several)",
    )
    parser.add_argument("--max-retries", type=int, help="requeues after a crash before the job fails (default 2)")
    parser.add_argument("--folder", help="submitit folder for scripts and logs (default <run dir parent>/slurm/<run name>)")
    parser.add_argument(
        "--sweep", action="append", default=[], metavar="KEY=V1,V2",
        help="sweep KEY over comma-separated values; repeat for a cartesian product (one job array)",
    )
    set_handler(parser, "flowmill.launchers.slurm_submit:launch_command")
