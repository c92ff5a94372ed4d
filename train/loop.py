"""The one training loop: data → task loss → DeepSpeed step → EMA → log → checkpoint.

Every process of the job runs ``train``. Rank 0 speaks (progress, MLflow, samples); the
other ranks get a NullTracker and a disabled progress bar instead of ``if rank == 0``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from flowmill.data.loader import StreamingLoader
from flowmill.train import run_dir as rundir
from flowmill.train.checkpoint import CheckpointManager, rng_state, set_rng_state
from flowmill.train.config import to_dict, validate
from flowmill.train.distributed import DistEnv, all_reduce_mean, init_distributed, shutdown
from flowmill.train.ema import EMA
from flowmill.train.engine import build_engine, lr_lambda
from flowmill.train.preemption import StopRequest
from flowmill.train.tasks import get_task_class
from flowmill.train.tracking import MLflowTracker, NullTracker, default_tracking_uri, flatten_config, run_tags
from flowmill.errors import UsageError

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
class Parts:
    """What one training job is made of, built once by ``_train`` and used by the step loop."""

    cfg: Any
    env: DistEnv
    run_dir: Path
    task: Any
    model: nn.Module  # the plain model (its parameters are the engine's, or a pipeline stage's share)
    engine: Any
    forward: CastInputs
    ema: EMA
    loader: StreamingLoader
    generator: torch.Generator
    checkpoints: CheckpointManager
    tracker: Any
    local: set[int] | None  # ids of the parameters a pipeline stage trains; None without pipeline

    @property
    def pipeline(self) -> bool:
        return self.local is not None


def setup_logging(env: DistEnv, run_dir: Path | None = None) -> None:
    """INFO on rank 0 (also into logs/train.log), warnings only elsewhere."""
    log.setLevel(logging.INFO if env.is_main else logging.WARNING)
    log.propagate = False
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"[flowmill rank {env.rank}] %(message)s"))
        log.addHandler(handler)
    if env.is_main and run_dir is not None:
        file_handler = logging.FileHandler(Path(run_dir) / "logs" / "train.log")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(file_handler)


def agree(env: DistEnv, value: Any) -> Any:
    """Rank 0's value, on every rank."""
    if env.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def prepare_run_dir(cfg: Any, env: DistEnv, resume: bool) -> Path:
    """Rank 0 decides the run dir and creates it; a refusal reaches every rank."""
    error = None
    run_dir = Path(cfg.run.dir) if cfg.run.dir else rundir.default_run_dir(cfg.run.name)
    if env.is_main:
        try:
            if resume:
                rundir.check_resumable(run_dir, cfg)
            else:
                rundir.create_run_dir(run_dir, cfg)
        except UsageError as exc:
            error = str(exc)
    run_dir, error = agree(env, (str(run_dir), error))
    if error:
        raise UsageError(error)
    cfg.run.dir = run_dir
    return Path(run_dir)


def slurm_tags(cfg: Any) -> dict[str, str]:
    """The sweep and the SLURM job a run belongs to, as MLflow tags (searchable in the UI)."""
    tags = {"flowmill.sweep_id": cfg.run.sweep_id} if cfg.run.sweep_id else {}
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    # submitit names an array element ARRAYID_TASK; a requeued job keeps its id.
    job_id = f"{array_job}_{array_task}" if array_job and array_task else os.environ.get("SLURM_JOB_ID")
    if job_id:
        tags["flowmill.slurm_job_id"] = job_id
    return tags


def start_tracker(cfg: Any, env: DistEnv, run_dir: Path, resume: bool, tags: dict):
    """MLflow on rank 0 (continuing the run's MLflow run on resume); NullTracker elsewhere."""
    if not env.is_main:
        return NullTracker()
    uri = cfg.tracking.uri or default_tracking_uri(run_dir.resolve().parent)
    previous = rundir.read_run_json(run_dir) if resume else {}
    tracker = MLflowTracker.start(
        uri,
        experiment_name=cfg.tracking.experiment,
        run_name=cfg.run.name,
        run_id=previous.get("run_id"),
        tags={**tags, **slurm_tags(cfg), "flowmill.run_dir": str(run_dir.resolve()), "flowmill.task": cfg.task},
        system_metrics=cfg.tracking.system_metrics,
        system_metrics_interval_s=cfg.tracking.system_metrics_interval_s,
    )
    tracker.log_params(flatten_config(to_dict(cfg)))
    return tracker


def train(
    cfg: Any, resume: bool = False, stop: StopRequest | None = None, *, run_info: dict[str, str] | None = None
) -> tuple[Path, str]:
    """Run (or continue) the training job described by ``cfg`` in this process.

    ``run_info``: more fields rank 0 writes into run.json when it starts the run (a launcher's
    job id and log folder). Returns the run dir and the outcome: ``finished``, or ``preempted``
    when ``stop`` was requested (a checkpoint of the last step was saved first).
    """
    env = init_distributed(cfg.trainer.device)
    try:
        validate(cfg, env.world_size)
        run_dir = prepare_run_dir(cfg, env, resume)
        setup_logging(env, run_dir)
        outcome = _train(cfg, env, run_dir, resume, stop or StopRequest(), run_info)
        return run_dir, outcome
    except BaseException as error:
        if not isinstance(error, (UsageError, KeyboardInterrupt, SystemExit)):
            print(f"[flowmill rank {env.rank}] fatal: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        raise
    finally:
        shutdown()


def build_parts(
    cfg: Any, env: DistEnv, run_dir: Path, resume: bool, run_info: dict[str, str] | None = None
) -> tuple[Parts, int]:
    """Build the job (task, model, engine, EMA, loader, tracker) and restore it when resuming.

    Returns the parts and the step to continue from.
    """
    threads = cfg.trainer.num_threads or max(1, (os.cpu_count() or 1) // max(1, env_local_world()))
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.trainer.seed)  # identical initial weights on every rank
    task = get_task_class(cfg.task)(cfg, env, run_dir)
    if env.is_main and not resume:
        task.prepare_run_dir()
    model = task.build_model().to(env.device)
    ema = EMA(model, cfg.ema.decay, cfg.ema.warmup)  # before DeepSpeed: ZeRO-3 partitions the live weights
    checkpoints = CheckpointManager(run_dir, cfg.checkpoint.keep_last, env)
    saved = checkpoints.latest_meta() if resume else {}
    reshard = resume and saved["world_size"] != env.world_size
    if reshard:
        keep_global_batch(cfg, saved["global_batch"], env)
        log.info("resuming a %d-process checkpoint on %d processes", saved["world_size"], env.world_size)
    pipeline = cfg.parallel.pipeline_stages > 1
    engine = build_engine(model, cfg, env, load_universal=reshard and checkpoints.needs_universal(),
                          loss_fn=task.criterion if pipeline else None)
    # The parameters this rank trains: a pipeline stage holds only its share of the model.
    local = {id(p) for p in engine.module.parameters()} if pipeline else None
    forward = CastInputs(engine, next(engine.module.parameters()).dtype, env.device)
    loader = StreamingLoader(
        cfg.data.path,
        rank=data_rank(cfg, env),
        world_size=data_world_size(cfg, env),
        batch_size=cfg.trainer.micro_batch_size,
        num_workers=cfg.data.num_workers,
        seed=cfg.trainer.seed,
        decode=task.decoder(),
        shuffle_buffer=cfg.data.shuffle_buffer,
        resampled=True,
        verify=cfg.data.verify_shards,
        max_skip_fraction=cfg.data.max_skip_fraction,
    )
    # Noise, timesteps, CFG drops: seeded per data-parallel replica, so that the stages of one
    # pipeline draw the same values.
    generator = torch.Generator().manual_seed(cfg.trainer.seed * 100_003 + data_rank(cfg, env))
    step = 0
    if resume:
        step, rank_states = checkpoints.load(engine, ema)
        reschedule(engine, cfg)
        if reshard:
            # Another world size: the data position is re-split over the new ranks; the noise
            # streams of the new ranks start afresh (they have no saved counterpart).
            loader.load_resharded([state["data"] for state in rank_states])
            generator.manual_seed(cfg.trainer.seed * 100_003 + env.rank + 7919 * step)
            torch.manual_seed(cfg.trainer.seed + env.rank + 7919 * step)
        else:
            loader.load_state_dict(rank_states[env.rank]["data"])
            generator.set_state(rank_states[env.rank]["generator"])
            set_rng_state(rank_states[env.rank]["rng"])
    tags = run_tags(env.world_size) if env.is_main else {}
    tracker = start_tracker(cfg, env, run_dir, resume, tags)
    if env.is_main:
        rundir.update_run_json(
            run_dir,
            tracking_uri=tracker.tracking_uri,
            experiment_id=tracker.experiment_id,
            run_id=tracker.run_id,
            git_commit=tags["flowmill.git_commit"],
            world_size=env.world_size,
            status="running",
            task=cfg.task,
            step=step,
            **(run_info or {}),
        )
        truncate_step_logs(run_dir / "logs" / "metrics.jsonl", after_step=step)
        log.info("run dir: %s", run_dir)
        if tracker.experiment_id is not None:
            log.info("MLflow: %s (experiment %s, run %s)", tracker.tracking_uri, tracker.experiment_id, tracker.run_id)
    truncate_step_logs(run_dir / "logs" / f"keys-rank-{env.rank}.jsonl", after_step=step)
    parts = Parts(cfg, env, run_dir, task, model, engine, forward, ema, loader, generator, checkpoints, tracker, local)
    return parts, step


def _train(cfg: Any, env: DistEnv, run_dir: Path, resume: bool, stop: StopRequest, run_info: dict[str, str] | None) -> str:
    parts, step = build_parts(cfg, env, run_dir, resume, run_info)
    status = "failed"
    try:
        step, status = run_steps(parts, step, stop)
    except KeyboardInterrupt:
        status = "killed"
        raise
    finally:
        if env.is_main:
            rundir.update_run_json(run_dir, status=status, step=step)
            # A preempted run is continued later under the same MLflow run id.
            parts.tracker.finish({"finished": "FINISHED", "killed": "KILLED", "preempted": "KILLED"}.get(status, "FAILED"))
    return status


def data_world_size(cfg: Any, env: DistEnv) -> int:
    """Data-parallel replicas: pipeline stages of one replica read the same batches."""
    return env.world_size // cfg.parallel.pipeline_stages


def data_rank(cfg: Any, env: DistEnv) -> int:
    return env.rank // cfg.parallel.pipeline_stages


def global_batch_size(cfg: Any, env: DistEnv) -> int:
    return cfg.trainer.micro_batch_size * cfg.trainer.grad_accum_steps * data_world_size(cfg, env)


def keep_global_batch(cfg: Any, global_batch: int, env: DistEnv) -> None:
    """Adapt accumulation (then the micro-batch) so a resumed run keeps its global batch size."""
    replicas = data_world_size(cfg, env)
    for micro in range(cfg.trainer.micro_batch_size, 0, -1):
        if global_batch % (micro * replicas) == 0:
            cfg.trainer.micro_batch_size, cfg.trainer.grad_accum_steps = micro, global_batch // (micro * replicas)
            log.info("global batch %d kept: micro-batch %d x accumulation %d x %d replicas",
                     global_batch, micro, cfg.trainer.grad_accum_steps, replicas)
            return
    raise UsageError(f"trainer.micro_batch_size: the global batch {global_batch} cannot be split over {replicas} replicas")


def reschedule(engine: Any, cfg: Any) -> None:
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


def env_local_world() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def micro_batches(parts: Parts, batches: Any, keys: list[str]):
    """Pipeline runs: (inputs, target) per micro-batch, as DeepSpeed's train_batch reads them."""
    dtype = parts.forward.dtype
    while True:
        batch = next(batches)
        keys.extend(batch["__key__"])
        inputs, target = parts.task.inputs_and_target(batch, parts.generator)
        yield tuple(a.to(dtype) if torch.is_floating_point(a) else a for a in inputs), target


def train_step(parts: Parts, batches: Any, keys: list[str]) -> tuple[torch.Tensor, float]:
    """One optimizer step (all micro-batches); returns the mean loss over micro-batches on this
    rank and the global gradient norm before clipping."""
    engine = parts.engine
    if parts.pipeline:
        loss = engine.train_batch(data_iter=micro_batches(parts, batches, keys)).detach().float()
        return loss, grad_norm_of(engine)
    # Plain fp32 DeepSpeed (no ZeRO, no bf16 optimizer) keeps no gradient norm: measure it here.
    measure = parts.cfg.parallel.zero_stage == 0 and parts.cfg.trainer.precision == "fp32"
    losses, norm = [], float("nan")
    for micro in range(parts.cfg.trainer.grad_accum_steps):
        batch = next(batches)
        keys.extend(batch["__key__"])
        loss, _ = parts.task.loss(parts.forward, batch, parts.generator)
        engine.backward(loss)
        if measure and micro == parts.cfg.trainer.grad_accum_steps - 1:
            # After the boundary's backward the gradients are averaged over ranks, not yet clipped.
            grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads).item() if grads else float("nan")
        engine.step()
        losses.append(loss.detach().float())
    return torch.stack(losses).mean(), norm if measure else grad_norm_of(engine)


def grad_norm_of(engine: Any) -> float:
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else float("nan")


def due(every: int, step: int, max_steps: int) -> bool:
    return step == max_steps or (every > 0 and step % every == 0)


def run_steps(parts: Parts, step: int, stop: StopRequest) -> tuple[int, str]:
    """Train from ``step`` to ``trainer.max_steps``; returns the last step and the outcome."""
    cfg, env, run_dir = parts.cfg, parts.env, parts.run_dir
    max_steps = cfg.trainer.max_steps
    global_batch = global_batch_size(cfg, env)
    progress = tqdm(total=max_steps, initial=step, disable=not env.is_main, desc="train", unit="step", dynamic_ncols=True)
    metrics_file = run_dir / "logs" / "metrics.jsonl"
    keys_file = run_dir / "logs" / f"keys-rank-{env.rank}.jsonl"
    batches = iter(parts.loader)
    while step < max_steps:
        started = time.perf_counter()
        lr = parts.engine.get_lr()[0]
        keys: list[str] = []
        loss, grad_norm = train_step(parts, batches, keys)
        step += 1
        parts.ema.update(parts.model, cfg.parallel.zero_stage, parts.local)
        loss_value = all_reduce_mean(loss).item()
        metrics = {
            "train/loss": loss_value,
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            "train/samples_per_s": global_batch / (time.perf_counter() - started),
            "data/skipped": float(parts.loader.stats["skipped"]),
        }
        evaluate = due(cfg.trainer.eval_every_steps, step, max_steps)
        sample = due(cfg.trainer.sample_every_steps, step, max_steps)
        save = due(cfg.checkpoint.every_steps, step, max_steps)
        stopping = step < max_steps and stop.agreed()
        if parts.pipeline and (evaluate or sample or save or stopping):
            parts.ema.sync_stages(parts.model, parts.local)
        if env.is_main and evaluate:
            metrics.update(parts.task.evaluate(parts.ema.module, step))
        parts.tracker.log_metrics(metrics, step=step)
        if env.is_main:
            append_jsonl(metrics_file, {"step": step, **metrics})
        if cfg.data.log_keys:
            append_jsonl(keys_file, {"step": step, "keys": keys})
        progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        progress.update(1)
        if save or stopping:
            save_checkpoint(parts, step)
        if stopping:
            log.info("stop requested (%s): saved step %d, leaving", stop.reason, step)
            progress.close()
            return step, "preempted"
        if env.is_main and sample:
            for path in parts.task.log_samples(parts.ema.module, step, run_dir / "samples"):
                parts.tracker.log_artifact(path, "samples")
    progress.close()
    return step, "finished"


def save_checkpoint(parts: Parts, step: int) -> None:
    cfg, env = parts.cfg, parts.env
    rank_state = {"data": parts.loader.state_dict(), "generator": parts.generator.get_state(), "rng": rng_state(), "step": step}
    meta = {"task": cfg.task, "family": get_task_class(cfg.task).family, "global_batch": global_batch_size(cfg, env)}
    parts.checkpoints.save(step, parts.engine, parts.ema, rank_state, meta=meta)
    log.info("checkpoint step %d saved", step)


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_step_logs(path: Path, after_step: int) -> None:
    """Drop JSON lines past the checkpoint being resumed: those steps run again."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= after_step]
    path.write_text("".join(line + "\n" for line in kept))


def run_from_cli(config_path: str | None, overrides: list[str], resume_dir: str | None) -> Path:
    """Entry of ``flowmill train``: load the config (a resumed run's own one) and train."""
    from flowmill.train.config import load_config

    if resume_dir:
        import yaml

        if not rundir.is_run_dir(Path(resume_dir)):
            raise UsageError(f"{resume_dir} is not a flowmill run dir (no run.json/config.yaml)")
        base = yaml.safe_load((Path(resume_dir) / rundir.CONFIG_YAML).read_text())
        cfg = load_config(None, overrides, base=base)
        cfg.run.dir = str(resume_dir)
        return train(cfg, resume=True)[0]
    cfg = load_config(config_path, overrides)
    return train(cfg, resume=False)[0]
