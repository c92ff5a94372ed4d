"""The one training loop: data → task loss → DeepSpeed step → EMA → log → checkpoint.

Every process of the job runs ``train``. Rank 0 speaks (progress, MLflow, samples); the
other ranks get a NullTracker and a disabled progress bar instead of ``if rank == 0``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from flowmill.errors import UsageError, one_line
from flowmill.run_dir import RunDir, step_tag
from flowmill.train.config import Config, check_data_source, load_config, validate
from flowmill.train.distributed import all_reduce_mean, init_distributed, shutdown
from flowmill.train.job import (
    TRACEBACK_FILE,
    Job,
    agree,
    build_job,
    make_plan,
    open_run_dir,
    record_death,
    setup_logging,
    traceback_file,
)
from flowmill.train.liveness import Heartbeat, is_timeout, timeout_message
from flowmill.train.preemption import StopRequest
from flowmill.train.progress import Progress
from flowmill.train.signals import stop_requested
from flowmill.train.tasks import get_task_class
from flowmill.train.tracking import log_samples

log = logging.getLogger("flowmill")

OUTCOME_STATUS = {"finished": "FINISHED", "killed": "KILLED", "preempted": "KILLED"}  # run.json status -> MLflow's


def train(cfg: Config, run_dir: RunDir | None = None, resume: bool = False, stop: StopRequest | None = None,
          run_info: dict[str, str] | None = None) -> tuple[RunDir, str]:
    """Run (or continue) the training job described by ``cfg`` in this process.

    ``run_dir`` overrides ``run.dir`` (a resumed run's own folder). ``run_info``: extra run.json
    fields rank 0 records when the run starts (e.g. its SLURM job). Returns the run dir and the
    outcome: ``finished``, or ``preempted`` when ``stop`` was requested (a checkpoint of the last
    step was saved first).
    """
    check_data_source(cfg)  # before the process group: a wrong data.path is one line, at once
    env = init_distributed(cfg.trainer.device, cfg.parallel.timeout_min)
    heartbeat = Heartbeat(env, interval_s=min(10.0, max(0.5, cfg.parallel.timeout_min * 60 / 6)))
    clean = False
    opened: RunDir | None = None  # the run dir once this process has opened it: a failure is recorded there
    try:
        validate(cfg, env.world_size)
        if resume and run_dir is not None and agree(env, run_dir.failed_start()):
            resume = False  # it stopped before its first checkpoint: nothing to continue, so it starts again
        run_dir = opened = open_run_dir(cfg, env, run_dir, resume)
        setup_logging(env, run_dir)
        plan = make_plan(cfg, env, run_dir, resume)
        job, step = build_job(cfg, plan, env, run_info or {})
        outcome = run_job(job, step, stop or StopRequest())
        clean = True
        return run_dir, outcome
    except BaseException as error:
        stop = stop_requested()
        if stop is not None and error is not stop:
            error = stop  # what failed after a stop signal failed because of it (a collective whose peer stopped)
        if opened is not None:
            record_death(opened, env, error, "killed" if isinstance(error, (KeyboardInterrupt, SystemExit)) else "failed")
        if is_timeout(error):
            message = timeout_message(env, cfg.parallel.timeout_min, heartbeat.silent_ranks())
            print(f"[flowmill rank {env.rank}] fatal: {message}", file=sys.stderr, flush=True)
            failure = RuntimeError(message)
            setattr(failure, TRACEBACK_FILE, traceback_file(error))
            raise failure from error
        if not isinstance(error, (UsageError, KeyboardInterrupt, SystemExit)):
            where = traceback_file(error)
            print(f"[flowmill rank {env.rank}] fatal: {one_line(f'{type(error).__name__}: {error}')}"
                  + (f" (traceback in {where})" if where else ""), file=sys.stderr, flush=True)
        raise error
    finally:
        heartbeat.stop()
        shutdown(clean)


def run_job(job: Job, step: int, stop: StopRequest) -> str:
    """Train ``job`` from ``step``; rank 0 records how it ended in run.json and MLflow."""
    if job.env.is_main:
        truncate_step_logs(job.run_dir.metrics_file, after_step=step)
    truncate_step_logs(job.run_dir.keys_file(job.env.rank), after_step=step)
    status = "failed"
    job.step = step
    try:
        job.step, status = run_steps(job, step, stop)
    except (KeyboardInterrupt, SystemExit):
        status = "killed"
        raise
    finally:
        if job.env.is_main:
            if status == "finished":
                job.tracker.log_model(job.run_dir.path, job.step, job.cfg.tracking.register_as)
            record_end(job, status)
    return status


def record_end(job: Job, status: str) -> None:
    """Rank 0: how the run ended, in run.json and MLflow. A run.json that cannot be written (a full
    disk may be why the run ended) is said in one line; it must not hide the error that ended the run."""
    try:
        job.run_dir.update_info(status=status, step=job.step)
    except OSError as error:
        print(f"[flowmill rank {job.env.rank}] could not record status {status} in {job.run_dir.info_file}: {error}",
              file=sys.stderr, flush=True)
    # A preempted run is continued later under the same MLflow run id.
    job.tracker.finish(OUTCOME_STATUS.get(status, "FAILED"))


def on_device(batches: Iterator[dict], device: torch.device) -> Iterator[dict]:
    """Batches with their tensors on ``device``; to a GPU they are copied from pinned host memory,
    without blocking the host."""
    if device.type != "cuda":
        yield from batches
        return
    for batch in batches:
        yield {key: value.pin_memory().to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
               for key, value in batch.items()}


def micro_batches(job: Job, batches: Iterator[dict], keys: list[str]) -> list[tuple[tuple[torch.Tensor, ...], torch.Tensor]]:
    """Pipeline runs: (inputs, target) of the step's micro-batches, as DeepSpeed's train_batch reads them.

    Made on every stage before the schedule runs: DeepSpeed reads them on the first and last stage
    only, and a task may run the whole pipeline to make a target (Task.pipeline_forward), which
    every stage must join and which cannot run inside another schedule."""
    dtype = job.forward.dtype
    micro = []
    for _ in range(job.plan.grad_accum_steps):
        batch = next(batches)
        keys.extend(batch["__key__"])
        inputs, target = job.task.inputs_and_target(batch, job.noise.generator)
        micro.append((tuple(a.to(dtype) if torch.is_floating_point(a) else a for a in inputs), target))
    return micro


def train_step(job: Job, batches: Iterator[dict], keys: list[str]) -> tuple[torch.Tensor, float]:
    """One optimizer step (all micro-batches); returns the mean loss over micro-batches on this
    rank and the global gradient norm before clipping."""
    engine = job.engine
    if job.pipeline:
        loss = engine.train_batch(data_iter=iter(micro_batches(job, batches, keys))).detach().float()
        return loss, grad_norm_of(engine)
    # Plain fp32 DeepSpeed (no ZeRO, no bf16 optimizer) keeps no gradient norm: measure it here.
    measure = job.cfg.parallel.zero_stage == 0 and job.cfg.trainer.precision == "fp32"
    accumulation = job.plan.grad_accum_steps
    losses, norm = [], float("nan")
    for micro in range(accumulation):
        batch = next(batches)
        keys.extend(batch["__key__"])
        loss, _ = job.task.loss(job.forward, batch, job.noise.generator)
        engine.backward(loss)
        if measure and micro == accumulation - 1:
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
    """Whether something done every ``every`` steps (0: only at the end) is due after ``step``."""
    return step == max_steps or (every > 0 and step % every == 0)


def run_steps(job: Job, step: int, stop: StopRequest) -> tuple[int, str]:
    """Train from ``step`` to ``trainer.max_steps``; returns the last step and the outcome."""
    cfg, env, run_dir = job.cfg, job.env, job.run_dir
    max_steps = cfg.trainer.max_steps
    progress = Progress(step, max_steps, cfg.trainer.log_every_steps, enabled=env.is_main)
    # Closed on the way out, whatever the way: the loader's workers end with it, not at interpreter
    # exit (a pipeline engine keeps the last micro-batch iterator, and with it this one, alive).
    with contextlib.closing(on_device(iter(job.loader), env.device)) as batches:
        while step < max_steps:
            if stop_requested() is not None:  # its raise was dropped where Python could not propagate it
                raise stop_requested()
            started = time.perf_counter()
            lr = job.engine.get_lr()[0]
            keys: list[str] = []
            loss, grad_norm = train_step(job, batches, keys)
            step += 1
            job.step = step
            if job.ema is not None:
                job.ema.update(job.model)
            loss_value = all_reduce_mean(loss).item()
            metrics = {
                "train/loss": loss_value,
                "train/lr": lr,
                "train/grad_norm": grad_norm,
                "train/samples_per_s": job.plan.global_batch_size / (time.perf_counter() - started),
                "data/skipped": float(job.loader.stats["skipped"]),
            }
            evaluate = due(cfg.trainer.eval_every_steps, step, max_steps)
            sample = due(cfg.trainer.sample_every_steps, step, max_steps)
            save = due(cfg.checkpoint.every_steps, step, max_steps)
            stopping = step < max_steps and stop.agreed()
            if evaluate:
                with job.eval_model() as model:
                    metrics.update(job.task.evaluate(model, step))
            job.tracker.log_metrics(metrics, step=step)
            if env.is_main:
                append_jsonl(run_dir.metrics_file, {"step": step, **metrics})
            if cfg.data.log_keys:
                append_jsonl(run_dir.keys_file(env.rank), {"step": step, "keys": keys})
            progress.update(step, metrics)
            if save or stopping:
                save_checkpoint(job, step)
            if env.is_main and (save or stopping or step % cfg.trainer.log_every_steps == 0):
                run_dir.update_info(step=step)  # run.json follows the run, not only its start and end
            if stopping:
                log.info("stop requested (%s): saved step %d, leaving", stop.reason, step)
                progress.close()
                return step, "preempted"
            if sample:
                with job.eval_model() as model:  # every rank: the weights may be spread over them
                    files = job.task.log_samples(model, step, run_dir.samples) if env.is_main else []
                log_samples(job.tracker, files, step)
        progress.close()
        return step, "finished"


class CheckpointError(RuntimeError):
    """Saving a checkpoint failed on this rank; the message names the rank, the checkpoint and the cause."""


def save_checkpoint(job: Job, step: int) -> None:
    meta = {"task": job.cfg.task, "family": get_task_class(job.cfg.task).family, "global_batch": job.plan.global_batch_size}
    try:
        job.checkpoints.save(step, meta=meta)
    except Exception as error:
        raise CheckpointError(
            f"rank {job.env.rank}: {save_failure(error, job.run_dir)} while saving checkpoint {step_tag(step)} in "
            f"{job.run_dir}"
        ) from error
    log.info("checkpoint step %d saved", step)


def save_failure(error: Exception, run_dir: RunDir) -> str:
    """What went wrong in a save, in a few words: a full disk by its name (torch's writer reports
    it as a bare "enforce fail" on some ranks, so the free space decides too), else the error."""
    full = getattr(error, "errno", None) == errno.ENOSPC
    try:
        full = full or shutil.disk_usage(run_dir.path).free == 0
    except OSError:
        pass
    return "no space left on device" if full else f"{type(error).__name__}: {error}"


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_step_logs(path: Path, after_step: int) -> None:
    """Drop JSON lines past the checkpoint being resumed: those steps run again."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= after_step]
    path.write_text("".join(line + "\n" for line in kept))


def run_from_cli(config_path: str | None, overrides: list[str], resume_dir: str | None) -> RunDir:
    """Entry of ``flowmill train``: load the config (a resumed run's own one) and train."""
    if resume_dir:
        run_dir = RunDir(resume_dir)
        if not run_dir.is_run() and not run_dir.failed_start():
            raise UsageError(f"{resume_dir} is not a flowmill run dir (no run.json/config.yaml)")
        cfg = load_config(None, overrides, base=run_dir.saved_config())
        return train(cfg, run_dir=run_dir, resume=True)[0]
    return train(load_config(config_path, overrides))[0]
