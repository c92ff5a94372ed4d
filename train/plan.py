"""What a training job derives from its config and the world it runs in.

The config a user wrote (plus overrides) is never changed. The values a job works out at run
time (the run dir when ``run.dir`` is unset, the micro-batch and accumulation that keep the
global batch on another world size) live here, and are logged as ``derived.*`` params.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from flowmill.errors import UsageError
from flowmill.run_dir import RunDir
from flowmill.train.config import Config


@dataclass(frozen=True)
class Plan:
    """The shape of one job: where it writes, how many processes, how each step is batched."""

    run_dir: RunDir  # where the run lives (run.dir, or runs/<name>-<timestamp> chosen by rank 0)
    world_size: int  # processes in the job
    pipeline_stages: int  # stages one data-parallel replica is cut into
    micro_batch_size: int  # samples per process per forward pass
    grad_accum_steps: int  # micro-batches per optimizer step
    resume: bool  # whether the job continues the run from its latest checkpoint

    @classmethod
    def of(cls, cfg: Config, run_dir: RunDir, world_size: int, resume: bool) -> Plan:
        """The plan the config asks for, as written."""
        return cls(run_dir, world_size, cfg.parallel.pipeline_stages, cfg.trainer.micro_batch_size,
                   cfg.trainer.grad_accum_steps, resume)

    @property
    def data_parallel(self) -> int:
        """Data-parallel replicas: the pipeline stages of one replica read the same batches."""
        return self.world_size // self.pipeline_stages

    def data_rank(self, rank: int) -> int:
        """The data-parallel replica process ``rank`` belongs to."""
        return rank // self.pipeline_stages

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.data_parallel

    def keeping_global_batch(self, global_batch: int) -> Plan:
        """This plan with the largest micro-batch (up to the configured one) and the accumulation
        that give ``global_batch`` on this world size: a resumed run keeps its batch size."""
        for micro in range(self.micro_batch_size, 0, -1):
            if global_batch % (micro * self.data_parallel) == 0:
                return replace(self, micro_batch_size=micro, grad_accum_steps=global_batch // (micro * self.data_parallel))
        raise UsageError(
            f"trainer.micro_batch_size: the global batch {global_batch} cannot be split over {self.data_parallel} replicas"
        )

    def params(self) -> dict[str, str]:
        """The derived values as MLflow params (``derived.*``)."""
        return {
            "derived.run_dir": str(self.run_dir.path.resolve()),
            "derived.world_size": str(self.world_size),
            "derived.data_parallel": str(self.data_parallel),
            "derived.micro_batch_size": str(self.micro_batch_size),
            "derived.grad_accum_steps": str(self.grad_accum_steps),
            "derived.global_batch_size": str(self.global_batch_size),
        }
