"""The contract between the training loop and a task."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from flowmill.data.loader import StreamingLoader
from flowmill.run_dir import RunDir
from flowmill.train.config import Config
from flowmill.train.distributed import DistEnv


class Task:
    """One learning problem. Subclasses fill in the model, the data decoding and the loss."""

    config_class: ClassVar[type[Config]] = Config  # the task's config: the shared sections plus its own
    family: ClassVar[str] = ""  # model family written into checkpoints and model folders
    # Pipeline runs: the whole model's forward pass without gradient, from any stage, the output on
    # every stage (flowmill.train.engine.PipelineForward); None otherwise.
    pipeline_forward: Callable[..., torch.Tensor] | None = None

    @classmethod
    def reads_data(cls, cfg: Config) -> bool:
        """Whether a run of ``cfg`` reads ``data.path`` (launchers check it exists before starting workers)."""
        return True

    def __init__(self, cfg: Config, env: DistEnv, run_dir: RunDir):
        self.cfg = cfg
        self.env = env
        self.run_dir = run_dir

    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        """Raise UsageError for values this task cannot train with."""

    def prepare_run_dir(self) -> None:
        """Rank 0, once per run: copy into the run dir what sampling and resume need."""

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def decode(self, sample: dict) -> dict:
        """Raw WebDataset sample (field -> bytes) → tensors; raise to reject a bad sample."""
        raise NotImplementedError

    def first_batch(self, source: str, count: int) -> dict:
        """The first ``count`` samples of ``source`` in shard order, decoded by this task, as one
        batch: the fixed held-out data of evaluations and benches."""
        loader = StreamingLoader(source, rank=0, world_size=1, batch_size=count, num_workers=0, seed=0,
                                 decode=self.decoder(), shuffle_buffer=0, resampled=False, storage=self.cfg.data.storage())
        try:
            return next(iter(loader))
        except StopIteration:
            raise ValueError(f"no sample of {source} decodes as this task's data (the loader skipped every one)") from None

    def build_loader(self, replica: int, replicas: int, batch_size: int) -> StreamingLoader:
        """The training batches of data-parallel replica ``replica`` of ``replicas``, ``batch_size``
        samples each: ``data.path`` decoded by this task, resampled epoch after epoch. The loop
        reads ``stats["skipped"]`` and checkpoints ``state_dict()`` per rank."""
        cfg = self.cfg
        return StreamingLoader(
            cfg.data.path,
            rank=replica,
            world_size=replicas,
            batch_size=batch_size,
            num_workers=cfg.data.num_workers,
            seed=cfg.trainer.seed,
            decode=self.decoder(),
            shuffle_buffer=cfg.data.shuffle_buffer,
            resampled=True,
            verify=cfg.data.verify_shards,
            max_skip_fraction=cfg.data.max_skip_fraction,
            storage=cfg.data.storage(),
        )

    def inputs_and_target(self, batch: dict, generator: torch.Generator) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """One micro-batch → the model's positional inputs and what ``criterion`` compares its output with.

        Random draws (noise, timesteps, condition dropout) come from ``generator`` only, so the
        stages of a pipeline, given the same generator state, agree. Every stage calls it for every
        micro-batch, before the step's pipeline schedule runs, so a target may come from the whole
        model's own output: ``self.pipeline_forward``, which the job sets on pipeline runs.
        """
        raise NotImplementedError

    def criterion(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Scalar loss of the model's output (used on a pipeline's last stage too)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Scalar loss of one micro-batch and extra metrics to log."""
        inputs, target = self.inputs_and_target(batch, generator)
        return self.criterion(model(*inputs), target), {}

    def log_samples(self, model: nn.Module, step: int, out_dir: Path) -> list[Path]:
        """Rank 0: samples from ``model`` (the EMA weights), written into ``out_dir``; returns the files.

        Rank 0 calls it alone (no collectives); what ``evaluate`` gathered for the same step may be reused.
        """
        return []

    def sample_command(self, model: nn.Module, source: Path, args: argparse.Namespace) -> int:
        """``flowmill sample`` for this task's models (``args`` as parsed by the CLI; ``source``: the
        checkpoint or model folder the weights came from); returns the exit code."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, step: int) -> dict:
        """Evaluation metrics of ``model`` (the EMA weights); called on every rank, each scoring its
        share of the held-out set (flowmill.train.evaluation); every rank returns the reduced figures."""
        return {}


class PriorBatches:
    """Data-free training batches: ``batch_size`` keys per batch and nothing else (the task draws its
    noise, and its prompts where it has any). A loader for the loop: ``stats``, and a position that checkpoints restore."""

    def __init__(self, replica: int, batch_size: int):
        self.replica = replica
        self.batch_size = batch_size
        self.delivered = 0

    @property
    def stats(self) -> dict:
        return {"delivered": self.delivered * self.batch_size, "skipped": 0}

    def __iter__(self):
        while True:
            keys = [f"prior-{self.replica}-{self.delivered}-{row}" for row in range(self.batch_size)]
            self.delivered += 1
            yield {"__key__": keys}

    def state_dict(self) -> dict:
        return {"delivered": self.delivered}

    def load_state_dict(self, state: dict) -> None:
        self.delivered = state["delivered"]

    def load_resharded(self, states: list[dict], step: int) -> None:
        self.delivered = step
