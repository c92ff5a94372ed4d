"""Sharded checkpoints: DeepSpeed's engine files plus every other piece of run state, by name.

Every piece that must survive a restart follows one protocol, ``state_dict()`` /
``load_state_dict(state)``, and is registered with the ``CheckpointManager`` under a name.
The manager drives them; the training loop never sees their keys.

- *Per-rank* pieces (data position, noise stream, global RNGs) are saved by every rank into
  ``rank-RRRRR.pt`` as ``{name: state}``.
- *Sharded* pieces (the EMA weights) are saved by every rank as ``<name>-rank-RRRRR.safetensors``:
  their state dict is flat, tensors in the file's body and plain values in its metadata, so
  the shards can be put together without flowmill's training stack (``flowmill.weights``).
- The model and optimizer are the engine's: DeepSpeed writes its own files (every rank its
  ZeRO shard).
On another world size, every piece is restored from the states of all the saving ranks
(``load_resharded(states, step)``).

``flowmill.json`` is written last, after every rank has finished: the checkpoint is complete.
``RUN_DIR/latest`` names the newest complete checkpoint and is replaced atomically only then,
so a crash mid-save never leaves a half checkpoint as latest (layout: flowmill.run_dir).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from flowmill.errors import UsageError
from flowmill.files import write_atomic
from flowmill.run_dir import COMPLETE_MARKER, Checkpoint, RunDir, step_tag
from flowmill.train.distributed import DistEnv, barrier
from flowmill.weights import load_flat, save_flat

# DeepSpeed's client state: lets ds_to_universal re-shard the optimizer for another world size.
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.4}}


@runtime_checkable
class Stateful(Protocol):
    """A piece of run state the checkpoint manager saves and restores by name."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class Reshardable(Stateful, Protocol):
    """A per-rank piece that can continue on another world size."""

    def load_resharded(self, states: list[dict[str, Any]], step: int) -> None:
        """Restore from ``states``, the states of every rank of the saving job, after ``step`` steps."""


class GlobalRNG:
    """Python's, NumPy's and torch's global generators (and CUDA's): what a step may draw from
    besides the task's own noise stream (dropout, DataLoader seeds)."""

    def __init__(self, seed: int, rank: int):
        self.seed = seed
        self.rank = rank

    def state_dict(self) -> dict[str, Any]:
        state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])

    def load_resharded(self, states: list[dict[str, Any]], step: int) -> None:
        # A new rank has no saved counterpart: its stream starts afresh, distinct per rank and step.
        torch.manual_seed(self.seed + self.rank + 7919 * step)


class NoiseStream:
    """The generator of a task's random draws (noise, timesteps, condition dropout).

    Seeded per data-parallel replica, so that the stages of one pipeline draw the same values.
    """

    def __init__(self, seed: int, replica: int):
        self.seed = seed
        self.replica = replica
        self.generator = torch.Generator().manual_seed(seed * 100_003 + replica)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])

    def load_resharded(self, states: list[dict[str, Any]], step: int) -> None:
        self.generator.manual_seed(self.seed * 100_003 + self.replica + 7919 * step)


class CheckpointManager:
    """Saves and restores everything a run needs to continue exactly.

    ``per_rank`` and ``shared`` name the pieces (see the module docstring); ``engine`` is the
    DeepSpeed engine holding model and optimizer.
    """

    def __init__(self, run_dir: RunDir, keep_last: int, env: DistEnv, engine: Any,
                 per_rank: Mapping[str, Reshardable], sharded: Mapping[str, Reshardable]):
        self.run_dir = run_dir
        self.keep_last = keep_last
        self.env = env
        self.engine = engine
        self.per_rank = dict(per_rank)
        self.sharded = dict(sharded)

    def save(self, step: int, meta: dict[str, Any]) -> Checkpoint:
        """Write checkpoint ``step`` on every rank, then mark it complete and move ``latest``."""
        tag = step_tag(step)
        checkpoint = Checkpoint(self.run_dir.checkpoints / tag)
        if self.env.is_main and checkpoint.path.exists():
            shutil.rmtree(checkpoint.path)  # a leftover of a save that crashed before completing
        barrier()
        self.engine.save_checkpoint(str(self.run_dir.checkpoints), tag=tag,
                                    client_state={"flowmill_step": step, **UNIVERSAL_INFO}, save_latest=False)
        torch.save({name: piece.state_dict() for name, piece in self.per_rank.items()}, checkpoint.rank_file(self.env.rank))
        for name, piece in self.sharded.items():
            save_flat(piece.state_dict(), shard_path(checkpoint, name, self.env.rank))
        barrier()
        if self.env.is_main:
            write_atomic(checkpoint.path / COMPLETE_MARKER, json.dumps({**meta, "step": step, "world_size": self.env.world_size}))
            self.run_dir.mark_latest(checkpoint)
            self._prune()
        barrier()
        return checkpoint

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        complete = [path for path in self.run_dir.step_dirs() if Checkpoint.is_complete(path)]
        for old in complete[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(Checkpoint(old).universal, ignore_errors=True)

    def load(self) -> int:
        """Restore the engine and every piece from the latest checkpoint; returns its step.

        On the world size it was saved with, DeepSpeed's own files load directly. On another
        world size, the ZeRO partitions are re-sharded through DeepSpeed's universal
        checkpoint format (converted once, next to the checkpoint; the engine must then have
        been built with ``load_universal``, see ``engine.build_engine``), and each per-rank
        piece is restored from all the saving ranks' states.
        """
        checkpoint = self.run_dir.latest()
        tag = checkpoint.path.name
        if needs_universal(checkpoint, self.env.world_size):
            self._convert_to_universal(checkpoint)
            tag = checkpoint.universal.name
        load_path, _ = self.engine.load_checkpoint(str(self.run_dir.checkpoints), tag=tag)
        if load_path is None:
            raise UsageError(f"DeepSpeed could not load {checkpoint.path}; the checkpoint is incomplete or corrupt")
        same_world = checkpoint.world_size == self.env.world_size
        saved = [torch.load(checkpoint.rank_file(rank), weights_only=False) for rank in range(checkpoint.world_size)]
        for name, piece in self.per_rank.items():
            if same_world:
                piece.load_state_dict(saved[self.env.rank][name])
            else:
                piece.load_resharded([state[name] for state in saved], checkpoint.step)
        for name, piece in self.sharded.items():
            if same_world:
                piece.load_state_dict(load_flat(shard_path(checkpoint, name, self.env.rank)))
            else:
                piece.load_resharded([load_flat(shard_path(checkpoint, name, rank))
                                      for rank in range(checkpoint.world_size)], checkpoint.step)
        return checkpoint.step

    def _convert_to_universal(self, checkpoint: Checkpoint) -> None:
        """Rank 0 converts ``checkpoint`` to DeepSpeed's universal format once; every rank waits."""
        target = checkpoint.universal
        error = None
        if self.env.is_main and not (target / COMPLETE_MARKER).exists():
            shutil.rmtree(target, ignore_errors=True)
            done = subprocess.run(
                [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(checkpoint.path),
                 "--output_folder", str(target), "--num_extract_workers", "1", "--num_merge_workers", "1"],
                capture_output=True, text=True,
            )
            if done.returncode != 0:
                error = f"converting {checkpoint.path} for a new world size failed: {done.stderr.strip().splitlines()[-1:]}"
            else:
                write_atomic(target / COMPLETE_MARKER, (checkpoint.path / COMPLETE_MARKER).read_text())
        barrier()
        if not (target / COMPLETE_MARKER).exists():
            raise UsageError(error or f"{target} was not written; see rank 0's error")


def shard_path(checkpoint: Checkpoint, name: str, rank: int) -> Path:
    """Where rank ``rank`` saves its shard of the sharded piece ``name``."""
    return checkpoint.path / f"{name}-rank-{rank:05d}.safetensors"


def needs_universal(checkpoint: Checkpoint, world_size: int) -> bool:
    """Whether resuming ``checkpoint`` on ``world_size`` processes re-shards ZeRO partitions: saved
    on another world size with partitioned optimizer files. Without ZeRO (stage 0) every rank
    saved the whole optimizer state, which loads on any world size as it is."""
    return checkpoint.world_size != world_size and any(checkpoint.path.glob("*optim_states.pt"))
