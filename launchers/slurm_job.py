"""The SLURM job of ``flowmill launch slurm``: what runs on the compute nodes.

One job is ``nodes x tasks_per_node`` tasks, one training process each. Every task runs the
pickled ``TrainingJob`` inside submitit's ``srun`` step and calls ``flowmill.train.loop.train``,
which reads the task's place from the step (``flowmill.train.distributed.place_of``: the master
is the step's first node, its port derived from the job id so a requeued job finds it again). Rank 0 of
the loop writes ``slurm_job_id`` and ``slurm_folder`` into run.json when it starts the run
(``run_info``), which ``flowmill runs logs RUN`` reads.

Preemption and time limit. SLURM sends USR2 (submitit's signal) ``signal_delay_s`` before the
time limit, and a preemption is announced the same way. Every task records it in a
``StopRequest``; at the next step boundary the ranks agree, save one sharded checkpoint
together and ``train`` returns ``preempted``; then rank 0 alone records the requeue in
run.json and requeues the job (``scontrol requeue``, as submitit does). The requeued job runs
the same pickle, finds ``RUN_DIR/latest`` and resumes, continuing the MLflow run recorded in
run.json. submitit's own USR2 handler is replaced because it checkpoints on rank 0 only, and a
ZeRO checkpoint needs every rank. Preemptions and time limits are requeued without limit:
each attempt makes progress.

Crashes. An exception is retried ``max_retries`` times: rank 0 writes the job's pickle again
with one retry less (submitit's own way of carrying state over a requeue) and requeues. Then
the job fails for good (sacct: FAILED), the traceback in the stderr log. Config errors are
not retried: they would fail again.
"""

from __future__ import annotations

import atexit
import dataclasses
import multiprocessing
import signal
import sys
import traceback

import submitit
from submitit.core.utils import DelayedSubmission, temporary_save_path

from flowmill.errors import UsageError
from flowmill.launchers.slurm_commands import requeue
from flowmill.run_dir import RunDir
from flowmill.train.config import load_config
from flowmill.train.loop import train
from flowmill.train.preemption import StopRequest


def block_sigterm() -> None:
    """Keep SIGTERM from this process and the DataLoader workers it forks later.

    SLURM sends SIGTERM to every process of the job before killing it, DataLoader workers
    included, and torch's worker handler dies on it, which would crash the step before USR2
    asks for the checkpoint. A blocked signal stays blocked in the workers forked later.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    atexit.register(kill_children)  # runs before multiprocessing's handler (registered earlier)


def kill_children() -> None:
    """Kill this process's multiprocessing children (DataLoader workers) with SIGKILL.

    The workers block SIGTERM (see ``block_sigterm``), so multiprocessing's own exit handler,
    which sends SIGTERM and then joins, would wait for them forever.
    """
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report each kill as a worker failure
    for child in multiprocessing.active_children():
        child.kill()


def record_job(run_dir: RunDir, run_info: dict[str, str]) -> None:
    """Name this job in a resumed run's run.json before training starts.

    A second ``flowmill launch slurm --resume`` of the run then sees the job from its first
    moment, and ``flowmill runs logs`` finds its logs even if it crashes while starting.
    """
    run_dir.update_info(**run_info)


def record_requeue(run_dir: RunDir, job_id: str) -> None:
    """Record in run.json that the run stopped at a checkpoint and its job ``job_id`` goes back in the queue."""
    run_dir.update_info(status="preempted", slurm_job_id=job_id)


@dataclasses.dataclass
class TrainingJob:
    """What every task of the job runs; submitit pickles it (one per array element)."""

    config: dict  # the run's resolved config, run.dir and launcher.slurm.folder absolute
    retries_left: int  # requeues still allowed after a crash

    def __call__(self) -> str:
        """Train this task's share of the run; returns ``finished`` (a preempted or retried task exits)."""
        job_env = submitit.JobEnvironment()
        rank = job_env.global_rank
        block_sigterm()
        cfg = load_config(None, [], base=self.config)
        run_dir = RunDir(cfg.run.dir)
        resume = run_dir.has_checkpoint()
        if not resume and run_dir.is_run() and not run_dir.failed_start():
            raise UsageError(f"{run_dir} stopped before its first checkpoint: nothing to resume; start a new run")
        run_info = {"slurm_job_id": job_env.job_id, "slurm_folder": str(job_env.paths.folder)}
        if rank == 0 and resume:
            record_job(run_dir, run_info)
        stop = StopRequest()
        stop.install((signal.SIGUSR2,))
        try:
            _, outcome = train(cfg, run_dir=run_dir, resume=resume, stop=stop, run_info=run_info)
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
        if outcome == "preempted":
            if rank == 0:
                record_requeue(run_dir, job_env.job_id)
                requeue(job_env.job_id)
                print(f"[flowmill rank 0] checkpoint saved; job {job_env.job_id} requeued", file=sys.stderr, flush=True)
            # No result file: for submitit the job is not over, it runs again.
            raise SystemExit(0)
        return outcome

    def requeue_after_crash(self, job_env: submitit.JobEnvironment) -> None:
        """Rewrite this job's pickle with one retry less, then requeue it."""
        pickle_path = job_env.paths.submitted_pickle
        delayed = DelayedSubmission.load(pickle_path)
        delayed.function = dataclasses.replace(self, retries_left=self.retries_left - 1)
        with temporary_save_path(pickle_path) as tmp:
            delayed.dump(tmp)
        requeue(job_env.job_id)
        print(f"[flowmill rank 0] crashed; job {job_env.job_id} requeued ({self.retries_left - 1} retries left)",
              file=sys.stderr, flush=True)
