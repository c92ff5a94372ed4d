"""``flowmill launch slurm`` and ``flowmill runs logs``: training jobs on SLURM through submitit.

One job is ``nodes x tasks_per_node`` tasks, one training process each. Every task reads its
place from ``submitit.JobEnvironment`` (global rank, local rank, world size; the master is the
first node of the job, its port is derived from the job id so a requeued job finds it again)
and calls ``flowmill.train.loop.train``.

Preemption and time limit. SLURM sends USR2 (submitit's signal) ``signal_delay_s`` before the
time limit, and a preemption is announced the same way. Every task records it in a
``StopRequest``; at the next step boundary the ranks agree, save one sharded checkpoint
together and ``train`` returns ``preempted``; then rank 0 alone requeues the job
(``scontrol requeue``, as submitit does). The requeued job runs the same pickle, finds
``RUN_DIR/latest`` and resumes, continuing the MLflow run recorded in run.json. submitit's
own USR2 handler is replaced because it checkpoints on rank 0 only, and a ZeRO checkpoint
needs every rank. Preemptions and time limits are requeued without limit: each attempt
makes progress.

Crashes. An exception is retried ``max_retries`` times: rank 0 writes the job's pickle again
with one retry less (submitit's own way of carrying state over a requeue) and requeues. Then
the job fails for good (sacct: FAILED), the traceback in the stderr log. Config errors are
not retried: they would fail again.

Logs. submitit writes ``FOLDER/<job id>_<rank>_log.out|err``; the folder defaults to
``<run dir parent>/slurm/<run dir name>``: outside the run dir, because a new run's dir is
created (empty) by rank 0 inside the job. run.json records ``slurm_job_id`` and
``slurm_folder``, which ``flowmill runs logs RUN`` reads.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import itertools
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import traceback
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flowmill.train import run_dir as rundir
from flowmill.train.config import load_config, to_dict
from flowmill.train.preemption import StopRequest
from flowmill.errors import UsageError

MASTER_PORT_BASE = 20000  # rendezvous ports are MASTER_PORT_BASE + job id % MASTER_PORT_SPAN
MASTER_PORT_SPAN = 10000  # below Linux's ephemeral range (32768+), so no client socket holds the port

# sbatch options that have their own launcher.slurm key (or that submitit sets itself).
RESERVED_SBATCH_OPTIONS = {
    "partition", "nodes", "ntasks-per-node", "time", "account", "qos", "constraint", "mem", "cpus-per-task",
    "gpus-per-node", "signal", "output", "error", "array", "job-name", "open-mode", "requeue",
}


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


# ---------------------------------------------------------------- configs of the runs to submit


def resumed_config(run_dir: Path, overrides: list[str]) -> Any:
    """The config a stopped run continues with: its config.yaml plus ``overrides``."""
    import yaml

    rundir.read_run_json(run_dir)  # refuses a folder that is not a run, naming it
    cfg = load_config(None, overrides, base=yaml.safe_load((run_dir / rundir.CONFIG_YAML).read_text()))
    cfg.run.dir = str(run_dir.resolve())
    cfg.launcher.slurm.folder = str(Path(cfg.launcher.slurm.folder or default_folder(run_dir.resolve())).resolve())
    return cfg


def new_run_configs(config_path: str, overrides: list[str], sweeps: list[str]) -> list[Any]:
    """One config per run to start: the config plus overrides, or one per point of the sweep grid."""
    base = load_config(config_path, overrides)
    if not sweeps:
        run_dir = Path(base.run.dir or rundir.default_run_dir(base.run.name)).resolve()
        base.run.dir = str(run_dir)
        base.launcher.slurm.folder = str(Path(base.launcher.slurm.folder or default_folder(run_dir)).resolve())
        return [base]
    # With a sweep, run.dir is the folder that receives one run dir per element.
    root = Path(base.run.dir or rundir.default_run_dir(base.run.name).parent).resolve()
    sweep_id = f"{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    folder = Path(base.launcher.slurm.folder or root / "slurm" / f"{base.run.name}-{sweep_id}").resolve()
    grid = sweep_grid(sweeps)
    swept = {item.partition("=")[0] for item in grid[0]}
    for item in overrides:
        if item.partition("=")[0] in swept:
            raise UsageError(f"--sweep {item.partition('=')[0]} is also set by the override {item}; keep one")
    configs = []
    for index, point in enumerate(grid):
        cfg = load_config(config_path, [*overrides, *point])
        cfg.run.dir = str(root / f"{base.run.name}-{sweep_id}-{index}")
        cfg.run.sweep_id = sweep_id
        cfg.launcher.slurm.folder = str(folder)
        configs.append(cfg)
    return configs


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


def check_before_submit(configs: list[Any], resume: bool) -> None:
    """Everything that can be refused before a job exists: SLURM, partition, sizes, configs, run dirs."""
    from flowmill.launchers.local import check_before_launch

    slurm = configs[0].launcher.slurm
    check_slurm_options(slurm)
    check_cluster(slurm)
    for cfg in configs:
        if resume:
            check_not_queued(Path(cfg.run.dir))
        check_before_launch(cfg, slurm.nodes * slurm.tasks_per_node, resume)
        run_dir = Path(cfg.run.dir)
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
    job_id = rundir.read_run_json(run_dir).get("slurm_job_id")
    state = live_state(job_id) if job_id else None
    if state:
        raise UsageError(
            f"{run_dir} is still in SLURM job {job_id} ({state}); a preempted job continues by itself. "
            f"Wait for it to end or `scancel {job_id}` first"
        )


def check_slurm_options(slurm: Any) -> None:
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


def check_cluster(slurm: Any) -> None:
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


def run_slurm(*command: str) -> str:
    """Run a SLURM command; returns its stdout, raises UsageError with its message."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        raise UsageError(f"{command[0]} got no answer in 60 s; is the SLURM controller up?") from None
    if done.returncode != 0:
        raise UsageError(f"{' '.join(command)} failed: {(done.stderr or done.stdout).strip()}")
    return done.stdout


def partitions() -> tuple[dict[str, int], str | None]:
    """The cluster's partitions with their node counts, and the default partition (or None)."""
    nodes: dict[str, int] = {}
    default = None
    for line in run_slurm("sinfo", "--noheader", "--format=%P %D").splitlines():
        name, count = line.split()
        if name.endswith("*"):
            name = default = name[:-1]
        nodes[name] = nodes.get(name, 0) + int(count)
    return nodes, default


# ---------------------------------------------------------------- submission


def sbatch_parameters(slurm: Any, job_name: str) -> dict[str, Any]:
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
    }


def submit(configs: list[Any]) -> list[Any]:
    """Submit one job (or one job array for several configs); returns submitit's jobs."""
    import submitit
    from submitit.core.utils import FailedJobError

    slurm = configs[0].launcher.slurm
    executor = submitit.SlurmExecutor(folder=slurm.folder)
    executor.update_parameters(**sbatch_parameters(slurm, configs[0].run.name))
    tasks = [TrainingJob(to_dict(cfg), slurm.max_retries) for cfg in configs]
    try:
        return [executor.submit(tasks[0])] if len(tasks) == 1 else executor.submit_array(tasks)
    except FailedJobError as error:
        raise UsageError(f"sbatch refused the job: {str(error).strip()}") from None


def tracking_uri(cfg: Any) -> str:
    """The MLflow store rank 0 of this run will log to (the loop's default when tracking.uri is unset)."""
    from flowmill.train.tracking import default_tracking_uri

    return cfg.tracking.uri or default_tracking_uri(Path(cfg.run.dir).parent)


def create_tracking_stores(configs: list[Any]) -> None:
    """Create the tables of the runs' SQLite MLflow stores now, in one process.

    Runs of a sweep start at the same moment; when several processes create the tables of a
    new SQLite store at once, MLflow's migrations collide and every one of them fails.
    """
    from mlflow import MlflowClient

    for uri in sorted({tracking_uri(cfg) for cfg in configs}):
        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            MlflowClient(uri).search_experiments(max_results=1)


def print_submission(configs: list[Any], jobs: list[Any], sweeps: list[str]) -> None:
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


# ---------------------------------------------------------------- inside the job


def master_port(job_id: str) -> int:
    """The rendezvous port of a job: the same on every attempt of that job."""
    return MASTER_PORT_BASE + int(job_id) % MASTER_PORT_SPAN


def process_group_env(job_env: Any) -> dict[str, str]:
    """RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT of this task.

    ``job_env`` is a ``submitit.JobEnvironment``; the master is the job's first node.
    """
    return {
        "RANK": str(job_env.global_rank),
        "LOCAL_RANK": str(job_env.local_rank),
        "WORLD_SIZE": str(job_env.num_tasks),
        "LOCAL_WORLD_SIZE": str(job_env.num_tasks // job_env.num_nodes),
        "MASTER_ADDR": job_env.hostnames[0],
        "MASTER_PORT": str(master_port(job_env.raw_job_id)),
    }


def requeue(job_id: str) -> None:
    """Put the job back in the queue (it keeps its id, pickle and log files)."""
    run_slurm("scontrol", "requeue", job_id)


def live_state(job_id: str) -> str | None:
    """The queue state of a pending or running job (``PENDING``, ``RUNNING``...), None once it has ended."""
    try:
        return run_slurm("squeue", "--noheader", "--format=%T", f"--jobs={job_id}").strip() or None
    except UsageError as error:
        if "Invalid job id" in str(error):  # squeue's answer for a job that left the queue
            return None
        raise


def kill_children() -> None:
    """Kill this process's multiprocessing children (DataLoader workers) with SIGKILL.

    The workers block SIGTERM (see ``TrainingJob``), so multiprocessing's own exit handler,
    which sends SIGTERM and then joins, would wait for them forever.
    """
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report each kill as a worker failure
    for child in multiprocessing.active_children():
        child.kill()


class JobStop(StopRequest):
    """The loop's stop flag; on rank 0 it also records the SLURM job in run.json at the first step boundary.

    A new run's dir and run.json are created inside ``train``. The step boundary is the first
    moment after that when this process can add to run.json without racing the loop's own
    writes: both happen in the training thread.
    """

    def __init__(self, record: Callable[[], None] | None) -> None:
        super().__init__()
        self._record = record

    def agreed(self) -> bool:
        if self._record is not None:
            self._record()
            self._record = None
        return super().agreed()


@dataclasses.dataclass
class TrainingJob:
    """What every task of the job runs; submitit pickles it (one per array element)."""

    config: dict  # the run's resolved config, run.dir and launcher.slurm.folder absolute
    retries_left: int  # requeues still allowed after a crash

    def __call__(self) -> str:
        """Train this task's share of the run; returns ``finished`` (a preempted or retried task exits)."""
        import submitit

        from flowmill.train.checkpoint import LATEST
        from flowmill.train.loop import train

        job_env = submitit.JobEnvironment()
        os.environ.update(process_group_env(job_env))
        rank = job_env.global_rank
        # SLURM sends SIGTERM to every process of the job before killing it, DataLoader workers
        # included, and torch's worker handler dies on it, which would crash the step before
        # USR2 asks for the checkpoint. A blocked signal stays blocked in the workers forked later.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        atexit.register(kill_children)  # runs before multiprocessing's handler (registered earlier)
        cfg = load_config(None, [], base=self.config)
        run_dir = Path(cfg.run.dir)
        resume = (run_dir / LATEST).is_file()
        if not resume and rundir.is_run_dir(run_dir):
            raise UsageError(f"{run_dir} stopped before its first checkpoint: nothing to resume; start a new run")

        def record() -> None:
            if (run_dir / rundir.RUN_JSON).is_file():
                rundir.update_run_json(run_dir, slurm_job_id=job_env.job_id, slurm_folder=str(job_env.paths.folder))

        if rank == 0:
            record()
        stop = JobStop(record if rank == 0 else None)
        stop.install((signal.SIGUSR2,))
        try:
            _, outcome = train(cfg, resume=resume, stop=stop)
        except UsageError:
            raise
        except Exception:
            if rank == 0 and self.retries_left > 0:
                traceback.print_exc()
                self.requeue_after_crash(job_env)
                raise SystemExit(1) from None
            if rank == 0:
                print(f"[flowmill rank 0] the job failed; no retries left (launcher.slurm.max_retries="
                      f"{cfg.launcher.slurm.max_retries})", file=sys.stderr, flush=True)
            raise
        finally:
            if rank == 0:
                record()
        if outcome == "preempted":
            if rank == 0:
                requeue(job_env.job_id)
                print(f"[flowmill rank 0] checkpoint saved; job {job_env.job_id} requeued", file=sys.stderr, flush=True)
            # No result file: for submitit the job is not over, it runs again.
            raise SystemExit(0)
        return outcome

    def requeue_after_crash(self, job_env: Any) -> None:
        """Rewrite this job's pickle with one retry less, then requeue it."""
        from submitit.core.utils import DelayedSubmission, temporary_save_path

        pickle_path = job_env.paths.submitted_pickle
        delayed = DelayedSubmission.load(pickle_path)
        delayed.function = dataclasses.replace(self, retries_left=self.retries_left - 1)
        with temporary_save_path(pickle_path) as tmp:
            delayed.dump(tmp)
        requeue(job_env.job_id)
        print(f"[flowmill rank 0] crashed; job {job_env.job_id} requeued ({self.retries_left - 1} retries left)",
              file=sys.stderr, flush=True)
