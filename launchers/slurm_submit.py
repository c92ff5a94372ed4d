"""``flowmill launch slurm`` on the login node: configs of the runs, checks, submission through submitit.

The flags become ``launcher.slurm.*`` overrides; a sweep becomes one config per point of its
grid. Each run's absolute run dir and submitit folder are passed to ``load_config`` as
``run.dir`` and ``launcher.slurm.folder`` overrides, so the config a job receives is one the
user could have written. Everything that can be refused is refused before a job exists;
then the MLflow stores are created, the job (or job array) is submitted and what was
submitted is printed. What runs inside the job is ``flowmill.launchers.slurm_job``.

Logs. submitit writes ``FOLDER/<job id>_<rank>_log.out|err``; the folder defaults to
``<run dir parent>/slurm/<run dir name>``: outside the run dir, because a new run's dir is
created (empty) by rank 0 inside the job. run.json records ``slurm_job_id`` and
``slurm_folder``, which ``flowmill runs logs RUN`` reads.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import submitit
from mlflow import MlflowClient
from submitit.core.utils import FailedJobError

from flowmill.errors import UsageError
from flowmill.launchers.local import check_before_launch
from flowmill.launchers.slurm_commands import live_state, partitions
from flowmill.launchers.slurm_job import TrainingJob
from flowmill.run_dir import RunDir
from flowmill.train.config import Config, SlurmConfig, load_config, to_dict
from flowmill.train.tracking_store import resolve_tracking_uri

# sbatch options that have their own launcher.slurm key (or that submitit sets itself).
RESERVED_SBATCH_OPTIONS = {
    "partition", "nodes", "ntasks-per-node", "time", "account", "qos", "constraint", "mem", "cpus-per-task",
    "gpus-per-node", "signal", "output", "error", "array", "job-name", "open-mode", "requeue",
}
# srun options (long, short) that submitit sets for the logs, or that would change the tasks the run was checked for.
RESERVED_SRUN_OPTIONS = {"--output": "-o", "--error": "-e", "--unbuffered": "-u", "--nodes": "-N", "--ntasks": "-n",
                         "--ntasks-per-node": None}


# ---------------------------------------------------------------- command line


def flag_overrides(args: argparse.Namespace) -> list[str]:
    """The launcher flags given on the command line, as ``launcher.slurm.*`` overrides."""
    flags = {
        "partition": args.partition, "nodes": args.nodes, "tasks_per_node": args.tasks_per_node,
        "time_min": args.time, "account": args.account, "qos": args.qos, "constraint": args.constraint,
        "mem": args.mem, "cpus_per_task": args.cpus_per_task, "gpus_per_node": args.gpus_per_node,
        "max_retries": args.max_retries, "folder": args.folder,
    }
    overrides = [f"launcher.slurm.{key}={value}" for key, value in flags.items() if value is not None]
    for item in args.slurm_extra:
        key, has_value, value = item.partition("=")
        overrides.append(f"launcher.slurm.extra.{key}={value if has_value else 'true'}")
    return overrides


def launch_command(args: argparse.Namespace) -> int:
    """``flowmill launch slurm``: check everything, submit, print where the run and its logs are."""
    overrides = [*args.overrides, *flag_overrides(args)]
    if args.resume:
        if args.sweep:
            raise UsageError("--sweep starts new runs; it cannot be combined with --resume")
        if args.config:
            # argparse hands the first override to the optional CONFIG positional.
            if "=" not in args.config:
                raise UsageError(f"--resume continues with the run's own config.yaml; drop {args.config}")
            overrides.insert(0, args.config)
        configs = [resumed_config(Path(args.resume), overrides)]
    elif not args.config:
        raise UsageError("pass a CONFIG file (or --resume RUN_DIR)")
    else:
        configs = new_run_configs(args.config, overrides, args.sweep)
    check_before_submit(configs, resume=bool(args.resume))
    create_tracking_stores(configs)
    jobs = submit(configs)
    print_submission(configs, jobs, args.sweep)
    return 0


def placed(run_dir: Path, folder: Path) -> list[str]:
    """The overrides that put a run in ``run_dir`` and its jobs' scripts and logs in ``folder``."""
    return [f"run.dir={run_dir}", f"launcher.slurm.folder={folder}"]


def resumed_config(run_dir: Path, overrides: list[str]) -> Config:
    """The config a stopped run continues with: its config.yaml plus ``overrides``."""
    RunDir(run_dir).info()  # refuses a folder that is not a run, naming it
    run_dir = run_dir.resolve()
    base = RunDir(run_dir).saved_config()
    folder = Path(load_config(None, overrides, base=base).launcher.slurm.folder or default_folder(run_dir)).resolve()
    return load_config(None, [*overrides, *placed(run_dir, folder)], base=base)


def new_run_configs(config_path: str, overrides: list[str], sweeps: list[str]) -> list[Config]:
    """One config per run to start: the config plus overrides, or one per point of the sweep grid."""
    base = load_config(config_path, overrides)
    if not sweeps:
        run_dir = Path(base.run.dir or RunDir.default(base.run.name).path).resolve()
        folder = Path(base.launcher.slurm.folder or default_folder(run_dir)).resolve()
        return [load_config(config_path, [*overrides, *placed(run_dir, folder)])]
    # With a sweep, run.dir is the folder that receives one run dir per element.
    root = Path(base.run.dir or RunDir.default(base.run.name).path.parent).resolve()
    sweep_id = f"{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    folder = Path(base.launcher.slurm.folder or root / "slurm" / f"{base.run.name}-{sweep_id}").resolve()
    grid = sweep_grid(sweeps)
    swept = {item.partition("=")[0] for item in grid[0]}
    for item in overrides:
        if item.partition("=")[0] in swept:
            raise UsageError(f"--sweep {item.partition('=')[0]} is also set by the override {item}; keep one")
    return [
        load_config(config_path, [
            *overrides, *point, f"run.sweep_id={sweep_id}", *placed(root / f"{base.run.name}-{sweep_id}-{index}", folder),
        ])
        for index, point in enumerate(grid)
    ]


def default_folder(run_dir: Path) -> Path:
    """``<run dir parent>/slurm/<run dir name>``: submitit's folder for a run's jobs."""
    return run_dir.parent / "slurm" / run_dir.name


def sweep_grid(sweeps: list[str]) -> list[list[str]]:
    """``["a=1,2", "b=x,y"]`` → the cartesian product as override lists, first key slowest."""
    axes, keys = [], set()
    for sweep in sweeps:
        key, has_values, values = sweep.partition("=")
        choices = values.split(",")
        if not has_values or not key or not all(choices):
            raise UsageError(f"--sweep {sweep!r} must look like dotted.key=value1,value2")
        if key in keys:
            raise UsageError(f"--sweep {key} is given twice; list all its values in one --sweep")
        if key.startswith("launcher.") or key in ("run.dir", "run.sweep_id"):
            raise UsageError(f"--sweep {key}: the runs of one job array share the launcher and the sweep's run dirs")
        keys.add(key)
        axes.append([f"{key}={value}" for value in choices])
    return [list(point) for point in itertools.product(*axes)]


# ---------------------------------------------------------------- checks before anything is submitted


def check_before_submit(configs: list[Config], resume: bool) -> None:
    """Everything that can be refused before a job exists: SLURM, partition, sizes, configs, run dirs."""
    slurm = configs[0].launcher.slurm
    check_slurm_options(slurm)
    check_cluster(slurm)
    for cfg in configs:
        if resume:
            check_not_queued(Path(cfg.run.dir))
        run_dir = Path(cfg.run.dir)
        check_before_launch(cfg, RunDir(run_dir), slurm.nodes * slurm.tasks_per_node, resume)
        if resume:
            continue
        # rank 0 creates a new run's dir inside the job and refuses one that is not empty
        if Path(slurm.folder).is_relative_to(run_dir):
            raise UsageError(
                f"launcher.slurm.folder: {slurm.folder} is inside the run dir {run_dir}, which the job creates "
                "empty; choose a folder outside it"
            )
        if run_dir.exists() and any(run_dir.iterdir()):
            raise UsageError(f"run.dir: {run_dir} exists and is not empty; choose another run.dir")


def check_not_queued(run_dir: Path) -> None:
    """Refuse to resume a run whose last SLURM job is still queued or running (two jobs, one run dir)."""
    job_id = RunDir(run_dir).info().get("slurm_job_id")
    state = live_state(job_id) if job_id else None
    if state:
        raise UsageError(
            f"{run_dir} is still in SLURM job {job_id} ({state}); a preempted job continues by itself. "
            f"Wait for it to end or `scancel {job_id}` first"
        )


def check_slurm_options(slurm: SlurmConfig) -> None:
    """Refuse launcher.slurm values no job could run with."""
    at_least = {"nodes": (slurm.nodes, 1), "tasks_per_node": (slurm.tasks_per_node, 1), "time_min": (slurm.time_min, 1),
                "gpus_per_node": (slurm.gpus_per_node, 0), "max_retries": (slurm.max_retries, 0),
                "signal_delay_s": (slurm.signal_delay_s, 0)}
    if slurm.cpus_per_task is not None:
        at_least["cpus_per_task"] = (slurm.cpus_per_task, 1)
    for key, (value, minimum) in at_least.items():
        if value < minimum:
            raise UsageError(f"launcher.slurm.{key}: must be at least {minimum}, got {value}")
    if slurm.signal_delay_s >= slurm.time_min * 60:
        raise UsageError(
            f"launcher.slurm.signal_delay_s: the checkpoint signal {slurm.signal_delay_s} s before the limit would come "
            f"at the start of a {slurm.time_min}-minute attempt; raise launcher.slurm.time_min or lower signal_delay_s"
        )
    for key in slurm.extra:
        if key.replace("_", "-") in RESERVED_SBATCH_OPTIONS:
            raise UsageError(
                f"launcher.slurm.extra.{key}: set by flowmill; use its own launcher.slurm key or flag "
                f"(reserved: {', '.join(sorted(RESERVED_SBATCH_OPTIONS))})"
            )
    if slurm.python is not None and not slurm.python.strip():
        raise UsageError("launcher.slurm.python: an empty command; leave it unset to start the tasks with this Python")
    for argument in slurm.srun_args:
        check_srun_argument(argument)


def check_srun_argument(argument: str) -> None:
    """Refuse an entry of launcher.slurm.srun_args that flowmill sets itself or that holds two arguments."""
    option = argument.partition("=")[0]
    words = option.split()
    if argument.startswith("-") and len(words) > 1:
        # submitit quotes every entry: srun would receive "--cpu-bind none" as one unknown option
        raise UsageError(f"launcher.slurm.srun_args: {argument!r} is several arguments in one entry; give each its own "
                         f"entry ({', '.join(words)}) or join option and value with '=' ({words[0]}={' '.join(words[1:])})")
    short = argument[:2] if argument.startswith("-") and not argument.startswith("--") else None
    for long_name, short_name in RESERVED_SRUN_OPTIONS.items():
        if option == long_name or (short is not None and short == short_name):
            raise UsageError(
                f"launcher.slurm.srun_args: {argument!r} is set by flowmill (the logs, and the tasks of "
                "launcher.slurm.nodes and tasks_per_node); reserved: "
                f"{', '.join(f'{name}/{alias}' if alias else name for name, alias in RESERVED_SRUN_OPTIONS.items())}"
            )


def check_cluster(slurm: SlurmConfig) -> None:
    """SLURM's commands exist, the partition exists and has the nodes asked for."""
    for tool in ("sbatch", "srun", "sinfo", "squeue"):
        if shutil.which(tool) is None:
            raise UsageError(
                f"{tool} is not on PATH: `flowmill launch slurm` submits with SLURM's commands; run it on a login "
                "node of the cluster (`make slurm-up` starts a local test cluster)"
            )
    nodes, default = partitions()
    partition = slurm.partition or default
    if partition is None:
        raise UsageError(f"launcher.slurm.partition: the cluster has no default partition; choose one of: {', '.join(nodes)}")
    if partition not in nodes:
        raise UsageError(f"launcher.slurm.partition: {partition!r} is not a partition of this cluster; choose one of: {', '.join(nodes)}")
    if slurm.nodes > nodes[partition]:
        raise UsageError(f"launcher.slurm.nodes: {slurm.nodes} nodes asked for, partition {partition} has {nodes[partition]}")


# ---------------------------------------------------------------- submission


def sbatch_parameters(slurm: SlurmConfig, job_name: str) -> dict[str, Any]:
    """submitit ``SlurmExecutor.update_parameters`` keywords for ``slurm`` (launcher.slurm)."""
    optional = {
        "partition": slurm.partition, "account": slurm.account, "qos": slurm.qos, "constraint": slurm.constraint,
        "mem": slurm.mem, "cpus_per_task": slurm.cpus_per_task, "gpus_per_node": slurm.gpus_per_node or None,
    }
    return {
        "job_name": job_name,
        "time": slurm.time_min,
        "nodes": slurm.nodes,
        "ntasks_per_node": slurm.tasks_per_node,
        "signal_delay_s": slurm.signal_delay_s,
        # Clusters where requeue is off by default (JobRequeue=0) still let this job requeue itself.
        "additional_parameters": {"requeue": True, **slurm.extra},
        **{key: value for key, value in optional.items() if value is not None},
        **({"setup": list(slurm.setup)} if slurm.setup else {}),
        **({"srun_args": list(slurm.srun_args)} if slurm.srun_args else {}),
    }


def submit(configs: list[Config]) -> list[submitit.Job]:
    """Submit one job (or one job array for several configs); returns submitit's jobs."""
    slurm = configs[0].launcher.slurm
    # python=None: submitit starts the tasks with this process's interpreter.
    executor = submitit.SlurmExecutor(folder=slurm.folder, python=slurm.python)
    executor.update_parameters(**sbatch_parameters(slurm, configs[0].run.name))
    tasks = [TrainingJob(to_dict(cfg), slurm.max_retries) for cfg in configs]
    try:
        return [executor.submit(tasks[0])] if len(tasks) == 1 else executor.submit_array(tasks)
    except FailedJobError as error:
        raise UsageError(f"sbatch refused the job: {str(error).strip()}") from None


def tracking_uri(cfg: Config) -> str:
    """The MLflow store rank 0 of this run will log to (tracking.uri, else $MLFLOW_TRACKING_URI, which the job
    inherits, else the loop's default)."""
    return resolve_tracking_uri(cfg.tracking.uri, Path(cfg.run.dir).parent)


def create_tracking_stores(configs: list[Config]) -> None:
    """Create the tables of the runs' SQLite MLflow stores now, in one process.

    Runs of a sweep start at the same moment; when several processes create the tables of a
    new SQLite store at once, MLflow's migrations collide and every one of them fails.
    """
    for uri in sorted({tracking_uri(cfg) for cfg in configs}):
        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            MlflowClient(uri).search_experiments(max_results=1)


def print_submission(configs: list[Config], jobs: list[submitit.Job], sweeps: list[str]) -> None:
    """Job id, run dirs, log files and MLflow location of what was just submitted."""
    slurm = configs[0].launcher.slurm
    shape = f"{slurm.nodes} node(s) x {slurm.tasks_per_node} task(s) on partition {slurm.partition or '(default)'}"
    if len(jobs) == 1:
        print(f"flowmill: submitted SLURM job {jobs[0].job_id}: {shape}, {slurm.time_min} min per attempt")
    else:
        array_id = jobs[0].job_id.partition("_")[0]
        print(f"flowmill: submitted SLURM job array {array_id} ({len(jobs)} runs of sweep {configs[0].run.sweep_id}): "
              f"{shape}, {slurm.time_min} min per attempt")
    points = sweep_grid(sweeps) if sweeps else [[]]
    for cfg, job, point in zip(configs, jobs, points):
        uri = tracking_uri(cfg)
        out, err = (str(path).replace(f"{job.job_id}_0_", f"{job.job_id}_<rank>_") for path in (job.paths.stdout, job.paths.stderr))
        if point:
            print(f"  job {job.job_id}: {' '.join(point)}")
        print(f"  run dir: {cfg.run.dir}")
        print(f"  logs:    {out}, {err}  (or: flowmill runs logs {cfg.run.dir} --rank R)")
        print(f"  MLflow:  {uri}, experiment {cfg.tracking.experiment!r}; the run id is in {cfg.run.dir}/run.json "
              "once rank 0 starts")


# ---------------------------------------------------------------- logs
