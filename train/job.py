"""Building a training job: run dir, plan, task, model, engine, EMA, data, tracking, restore.

``build_job`` turns a config and this process's place in the job into a ``Job``, restored from
the run's latest checkpoint when resuming; ``flowmill.train.loop`` steps it.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch import nn

from flowmill.arguments import LOG_LEVEL_ENV
from flowmill.data.loader import StreamingLoader
from flowmill.errors import UsageError, one_line
from flowmill.run_dir import CONFIG_FILE, RunDir
from flowmill.train.checkpoint import CheckpointManager, GlobalRNG, NoiseStream, needs_universal
from flowmill.train.config import Config, to_dict
from flowmill.train.distributed import DistEnv, placement
from flowmill.train.ema import EMA
from flowmill.train.engine import PipelineForward, build_engine, lr_lambda
from flowmill.train.plan import Plan
from flowmill.train.tasks import get_task_class
from flowmill.train.tasks.base import Task
from flowmill.train.tracking import MLflowTracker, NullTracker, Tracker
from flowmill.train.tracking_params import environment_tags, flatten_config, run_tags
from flowmill.train.tracking_store import resolve_tracking_uri

log = logging.getLogger("flowmill")


class CastInputs:
    """Calls the engine with floating inputs in the weights' dtype; bf16 runs under autocast so
    that fp32 islands inside a model (norms, embeddings) meet bf16 weights safely."""

    def __init__(self, engine: Any, dtype: torch.dtype, device: torch.device):
        self.engine = engine
        self.dtype = dtype
        self.device_type = device.type

    def __call__(self, *args: Any) -> Any:
        args = tuple(a.to(self.dtype) if torch.is_floating_point(a) else a for a in args)
        with torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return self.engine(*args)


@dataclass
class Job:
    """What one training job is made of, built once by ``build_job`` and stepped by the loop."""

    cfg: Config
    plan: Plan
    env: DistEnv
    task: Task
    model: nn.Module  # the plain model (its parameters are the engine's, or a pipeline stage's share)
    engine: Any  # DeepSpeed's engine (or pipeline engine) owning model, optimizer and schedule
    forward: CastInputs
    ema: EMA | None  # None with ema.enabled=false
    loader: StreamingLoader
    noise: NoiseStream
    checkpoints: CheckpointManager
    tracker: Tracker
    local: set[int] | None  # ids of the parameters a pipeline stage trains; None without pipeline
    step: int = 0  # the last optimizer step finished (the checkpoint's step until the loop moves on)

    @property
    def pipeline(self) -> bool:
        return self.local is not None

    @property
    def run_dir(self) -> RunDir:
        return self.plan.run_dir

    @contextmanager
    def eval_model(self) -> Iterator[nn.Module]:
        """The weights evaluations and samples use, as a whole fp32 model in eval mode on every rank
        (collective): the EMA, or with ``ema.enabled=false`` the live weights (a zero-decay average
        is a copy of them, gathered like the EMA from wherever the ranks hold them)."""
        weights = self.ema or EMA(self.model, self.env, decay=0.0, warmup=False, local=self.local)
        with weights.averaged(self.model) as model:
            yield model


def setup_logging(env: DistEnv, run_dir: RunDir | None = None) -> None:
    """$FLOWMILL_LOG_LEVEL (default info) on rank 0, also into logs/train.log; other ranks add
    only warnings and errors, unless the level is debug."""
    level = logging.getLevelName(os.environ.get(LOG_LEVEL_ENV, "info").upper())
    log.setLevel(level if env.is_main or level == logging.DEBUG else max(level, logging.WARNING))
    log.propagate = False
    for handler in list(log.handlers):  # the CLI's own, or an earlier run's in this process
        log.removeHandler(handler)
        handler.close()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[flowmill rank {env.rank}] %(message)s"))
    log.addHandler(handler)
    if env.is_main and run_dir is not None:
        file_handler = logging.FileHandler(run_dir.train_log)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(file_handler)


TRACEBACK_FILE = "flowmill_traceback_file"  # attribute of an error whose traceback record_death wrote into a log


def record_death(run_dir: RunDir, env: DistEnv, error: BaseException, status: str) -> None:
    """Append why this rank stopped, with the traceback, to logs/train.log (one write, so ranks
    do not interleave) and note that log on ``error`` (``traceback_file``); rank 0 also ends a
    run.json that still says ``running`` with ``status``."""
    trace = "".join(traceback.format_exception(error))
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        with open(run_dir.train_log, "a") as handle:
            handle.write(f"{stamp} ERROR rank {env.rank}: the run stopped ({status}): {one_line(f'{type(error).__name__}: {error}')}\n{trace}")
        setattr(error, TRACEBACK_FILE, run_dir.train_log)
        if env.is_main and run_dir.info_file.is_file() and run_dir.info().get("status") == "running":
            run_dir.update_info(status=status)
    except OSError as exn:  # a full disk may be why the run died: the error itself must still reach the user
        print(f"[flowmill rank {env.rank}] could not record the failure in {run_dir}: {exn}", file=sys.stderr, flush=True)


def traceback_file(error: BaseException) -> Path | None:
    """The log ``record_death`` wrote ``error``'s traceback into, if it did."""
    return getattr(error, TRACEBACK_FILE, None)


def agree(env: DistEnv, value: Any) -> Any:
    """Rank 0's value, on every rank."""
    if env.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def open_run_dir(cfg: Config, env: DistEnv, run_dir: RunDir | None, resume: bool) -> RunDir:
    """Rank 0 decides the run dir (``run_dir``, else ``run.dir``, else a new timestamped one) and
    creates it, or checks that the run can continue with ``cfg``; a refusal reaches every rank."""
    error = None
    if run_dir is None:
        run_dir = RunDir(cfg.run.dir) if cfg.run.dir else RunDir.default(cfg.run.name)
    if env.is_main:
        try:
            if resume:
                run_dir.refuse_changed_model(to_dict(cfg))
            else:
                run_dir.create(to_dict(cfg))
        except UsageError as exc:
            error = str(exc)
    path, error = agree(env, (str(run_dir.path), error))
    if error:
        raise UsageError(error)
    return RunDir(path)


def make_plan(cfg: Config, env: DistEnv, run_dir: RunDir, resume: bool) -> Plan:
    """The job's plan; a resume on another world size keeps the run's global batch."""
    plan = Plan.of(cfg, run_dir, env.world_size, resume)
    if resume:
        checkpoint = run_dir.latest()
        if checkpoint.world_size != env.world_size:
            plan = plan.keeping_global_batch(checkpoint.meta["global_batch"])
            log.info("resuming a %d-process checkpoint on %d processes: global batch %d kept as micro-batch %d x "
                     "accumulation %d x %d replicas", checkpoint.world_size, env.world_size, plan.global_batch_size,
                     plan.micro_batch_size, plan.grad_accum_steps, plan.data_parallel)
    return plan


def slurm_tags(cfg: Config) -> dict[str, str]:
    """The sweep and the SLURM job a run belongs to, as MLflow tags (searchable in the UI)."""
    tags = {"flowmill.sweep_id": cfg.run.sweep_id} if cfg.run.sweep_id else {}
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    # submitit names an array element ARRAYID_TASK; a requeued job keeps its id.
    job_id = f"{array_job}_{array_task}" if array_job and array_task else os.environ.get("SLURM_JOB_ID")
    if job_id:
        tags["flowmill.slurm_job_id"] = job_id
    return tags


def start_tracker(cfg: Config, plan: Plan, env: DistEnv, tags: dict[str, str]) -> Tracker:
    """MLflow on rank 0 (continuing the run's MLflow run on resume); NullTracker elsewhere.

    The MLflow run is named after the run dir (unique: timestamped, or a sweep element's index) and
    carries the user's ``tracking.tags`` under flowmill's own, its description, its params and its
    config as the ``config.yaml`` artifact. Calls MLflow cannot take by the end of the run are kept
    in the run dir for ``flowmill runs sync``."""
    if not env.is_main:
        return NullTracker()
    run_dir = plan.run_dir
    uri = resolve_tracking_uri(cfg.tracking.uri, run_dir.path.resolve().parent)
    previous = run_dir.info() if plan.resume else {}
    own_tags = {**tags, **slurm_tags(cfg), "flowmill.run_dir": str(run_dir.path.resolve()), "flowmill.task": cfg.task,
                "flowmill.run_name": cfg.run.name}
    tracker = MLflowTracker.start(
        uri,
        experiment_name=cfg.tracking.experiment,
        artifact_location=cfg.tracking.artifact_location,
        run_name=run_dir.path.resolve().name,
        run_id=previous.get("run_id"),
        tags={**cfg.tracking.tags, **own_tags},
        description=cfg.tracking.description,
        system_metrics=cfg.tracking.system_metrics,
        system_metrics_interval_s=cfg.tracking.system_metrics_interval_s,
        retry_after_s=cfg.tracking.retry_after_s,
        run_dir=run_dir,
    )
    tracker.log_params({**flatten_config(to_dict(cfg)), **plan.params()})
    tracker.log_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), CONFIG_FILE)
    return tracker


def reschedule(engine: Any, cfg: Config) -> None:
    """Apply the (possibly extended) schedule to the restored step.

    The optimizer's saved learning rate came from the schedule the run was started with;
    a resume that changes trainer.max_steps must continue on the new curve.
    """
    scheduler = engine.lr_scheduler
    factor = lr_lambda(cfg)
    scheduler.lr_lambdas = [factor] * len(scheduler.base_lrs)
    lrs = [base * factor(scheduler.last_epoch) for base in scheduler.base_lrs]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def threads_per_process(cfg: Config) -> int:
    """``trainer.num_threads``, or this machine's cores shared by the job's processes on it."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return cfg.trainer.num_threads or max(1, (os.cpu_count() or 1) // max(1, local_world))


def build_job(cfg: Config, plan: Plan, env: DistEnv, run_info: dict[str, str]) -> tuple[Job, int]:
    """Build the job and restore it from the latest checkpoint when resuming.

    Rank 0 records the run in run.json (with ``run_info``, e.g. the SLURM job). Returns the job
    and the step to continue from.
    """
    torch.set_num_threads(threads_per_process(cfg))
    torch.manual_seed(cfg.trainer.seed)  # identical initial weights on every rank
    task = get_task_class(cfg.task)(cfg, env, plan.run_dir)
    if env.is_main and not plan.resume:
        task.prepare_run_dir()
    model = task.build_model().to(env.device)
    reshard = plan.resume and needs_universal(plan.run_dir.latest(), env.world_size)
    pipeline = cfg.parallel.pipeline_stages > 1
    engine = build_engine(model, cfg, plan, load_universal=reshard, loss_fn=task.criterion if pipeline else None)
    # The parameters this rank trains: a pipeline stage holds only its share of the model.
    local = {id(p) for p in engine.module.parameters()} if pipeline else None
    forward = CastInputs(engine, next(engine.module.parameters()).dtype, env.device)
    if pipeline:
        task.pipeline_forward = PipelineForward(engine, forward.dtype)
    ema = EMA(model, env, cfg.ema.decay, cfg.ema.warmup, local, placement(cfg.ema.device, env.device, "ema.device")) \
        if cfg.ema.enabled else None
    replica = plan.data_rank(env.rank)
    loader = task.build_loader(replica, plan.data_parallel, plan.micro_batch_size)
    noise = NoiseStream(cfg.trainer.seed, replica)
    checkpoints = CheckpointManager(
        plan.run_dir, cfg.checkpoint.keep_last, env, engine,
        per_rank={"data": loader, "noise": noise, "rng": GlobalRNG(cfg.trainer.seed, env.rank)},
        sharded={"ema": ema} if ema is not None else {},
    )
    step = 0
    if plan.resume:
        step = checkpoints.load()
        reschedule(engine, cfg)
    tags = run_tags(env.world_size) if env.is_main else {}
    tracker = start_tracker(cfg, plan, env, tags)
    if env.is_main:
        plan.run_dir.update_info(
            tracking_uri=tracker.tracking_uri,
            experiment_id=tracker.experiment_id,
            run_id=tracker.run_id,
            git_commit=tags["flowmill.git_commit"],
            world_size=env.world_size,
            status="running",
            task=cfg.task,
            step=step,
            **run_info,
        )
        log.info("run dir: %s", plan.run_dir)
        log.info("environment: %s", "; ".join(f"{name.removeprefix('flowmill.')} {value}"
                                              for name, value in environment_tags().items()))
        if tracker.experiment_id is not None:
            log.info("MLflow: %s (experiment %s, run %s)", tracker.tracking_uri, tracker.experiment_id, tracker.run_id)
    job = Job(cfg, plan, env, task, model, engine, forward, ema, loader, noise, checkpoints, tracker, local, step)
    return job, step
