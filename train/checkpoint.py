"""Sharded checkpoints: DeepSpeed's engine files plus flowmill's run state, and ``latest``.

Layout of one checkpoint, ``RUN_DIR/checkpoints/step-00000010/``:
  DeepSpeed's files (model states, ZeRO optimizer shards: every rank writes its own),
  ``rank-00000.pt`` ... per-rank flowmill state (data position, RNG, generator),
  ``ema.safetensors`` (rank 0: full EMA weights, readable without DeepSpeed),
  ``flowmill.json`` written last, after every rank has finished: the checkpoint is complete.
``RUN_DIR/latest`` names the newest complete checkpoint; it is replaced atomically only
after ``flowmill.json`` exists, so a crash mid-save never leaves a half checkpoint as latest.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowmill.train.distributed import DistEnv, barrier
from flowmill.errors import UsageError

LATEST = "latest"
COMPLETE_MARKER = "flowmill.json"
EMA_FILE = "ema.safetensors"
UNIVERSAL_SUFFIX = "_universal"  # step-N_universal/: step-N in DeepSpeed's universal format (world-size change)


def step_tag(step: int) -> str:
    return f"step-{step:08d}"


def write_atomic(path: Path, text: str) -> None:
    """Write a small file so that readers see the old or the new content, never half."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    """Every global RNG a step can touch."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Saves and restores everything a run needs to continue exactly."""

    def __init__(self, run_dir: Path, keep_last: int, env: DistEnv):
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "checkpoints"
        self.keep_last = keep_last
        self.env = env

    def save(self, step: int, engine: Any, ema: Any, rank_state: dict, meta: dict) -> Path:
        """Write checkpoint ``step`` on every rank, then mark it complete and move ``latest``."""
        tag = step_tag(step)
        step_dir = self.root / tag
        if self.env.is_main and step_dir.exists():
            shutil.rmtree(step_dir)  # a leftover of a save that crashed before completing
        barrier()
        # universal_checkpoint_info lets DeepSpeed re-shard the optimizer for another world size.
        engine.save_checkpoint(
            str(self.root),
            tag=tag,
            client_state={"flowmill_step": step, "universal_checkpoint_info": {"universal_checkpoint_version": 0.4}},
            save_latest=False,
        )
        torch.save(rank_state, step_dir / f"rank-{self.env.rank:05d}.pt")
        if self.env.is_main:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in ema.module.state_dict().items()}, step_dir / EMA_FILE)
            torch.save({"num_updates": ema.num_updates}, step_dir / "ema_meta.pt")
        barrier()
        if self.env.is_main:
            write_atomic(step_dir / COMPLETE_MARKER, json.dumps({**meta, "step": step, "world_size": self.env.world_size}))
            write_atomic(self.run_dir / LATEST, f"checkpoints/{tag}\n")
            self._prune()
        barrier()
        return step_dir

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        complete = [p for p in step_dirs(self.root) if (p / COMPLETE_MARKER).exists()]
        for old in complete[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(universal_dir(old), ignore_errors=True)

    def latest(self) -> Path:
        """The newest complete checkpoint, or UsageError saying what is wrong."""
        return latest_checkpoint(self.run_dir)

    def latest_meta(self) -> dict:
        """What the newest complete checkpoint records (step, world_size, global_batch, ...)."""
        return json.loads((self.latest() / COMPLETE_MARKER).read_text())

    def needs_universal(self) -> bool:
        """Whether resuming the latest checkpoint here re-shards ZeRO partitions: saved on another
        world size with partitioned optimizer files. Without ZeRO (stage 0) every rank saved the
        whole optimizer state, which loads on any world size as it is."""
        return self.latest_meta()["world_size"] != self.env.world_size and any(self.latest().glob("*optim_states.pt"))

    def load(self, engine: Any, ema: Any) -> tuple[int, list[dict]]:
        """Restore engine and EMA; returns (step, the per-rank states of the saving job).

        On the world size it was saved with, DeepSpeed's own files load directly. On another
        world size, the ZeRO partitions are re-sharded through DeepSpeed's universal
        checkpoint format (converted once, next to the checkpoint); the engine must then
        have been built with ``load_universal`` (see ``engine.build_engine``).
        """
        step_dir = self.latest()
        meta = self.latest_meta()
        tag = step_dir.name
        if self.needs_universal():
            self._convert_to_universal(step_dir)
            tag = universal_dir(step_dir).name
        load_path, _ = engine.load_checkpoint(str(self.root), tag=tag)
        if load_path is None:
            raise UsageError(f"DeepSpeed could not load {step_dir}; the checkpoint is incomplete or corrupt")
        from safetensors.torch import load_file

        ema.module.load_state_dict(load_file(step_dir / EMA_FILE))
        ema.num_updates = torch.load(step_dir / "ema_meta.pt")["num_updates"]
        rank_states = [torch.load(step_dir / f"rank-{rank:05d}.pt", weights_only=False) for rank in range(meta["world_size"])]
        return meta["step"], rank_states

    def _convert_to_universal(self, step_dir: Path) -> None:
        """Rank 0 converts ``step_dir`` to DeepSpeed's universal format once; every rank waits."""
        target = universal_dir(step_dir)
        error = None
        if self.env.is_main and not (target / COMPLETE_MARKER).exists():
            import subprocess
            import sys

            shutil.rmtree(target, ignore_errors=True)
            done = subprocess.run(
                [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(step_dir),
                 "--output_folder", str(target), "--num_extract_workers", "1", "--num_merge_workers", "1"],
                capture_output=True, text=True,
            )
            if done.returncode != 0:
                error = f"converting {step_dir} for a new world size failed: {done.stderr.strip().splitlines()[-1:]}"
            else:
                write_atomic(target / COMPLETE_MARKER, (step_dir / COMPLETE_MARKER).read_text())
        barrier()
        if not (target / COMPLETE_MARKER).exists():
            raise UsageError(error or f"{target} was not written; see rank 0's error")


def step_dirs(root: Path) -> list[Path]:
    """The checkpoint folders under ``root``, oldest first; not their universal-format copies."""
    return sorted(p for p in root.glob("step-*") if not p.name.endswith(UNIVERSAL_SUFFIX))


def universal_dir(step_dir: Path) -> Path:
    """Where the universal-format copy of a checkpoint goes."""
    return step_dir.with_name(step_dir.name + UNIVERSAL_SUFFIX)


def latest_checkpoint(run_dir: Path) -> Path:
    """Resolve ``RUN_DIR/latest`` to a complete checkpoint folder."""
    pointer = Path(run_dir) / LATEST
    if not pointer.is_file():
        raise UsageError(f"{run_dir} has no checkpoint yet ({pointer} is missing); start a new run with `flowmill train`")
    target = Path(run_dir) / pointer.read_text().strip()
    if not target.name.startswith("step-") or not (target / COMPLETE_MARKER).is_file():
        raise UsageError(
            f"{pointer} is corrupt: it names {target}, which is not a complete checkpoint; "
            f"point it at one of {[p.name for p in step_dirs(Path(run_dir) / 'checkpoints')]} "
            "(write e.g. 'checkpoints/step-00000010' into it)"
        )
    return target
