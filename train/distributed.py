"""Process-group setup and the one place where the device is chosen.

A process learns its place from the environment torchrun, ``flowmill launch`` and the
SLURM launcher all set: RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT. A single
process without them is world size 1.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def choose_device(requested: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without a GPU is an error, not a fallback."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu or auto")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def backend_for(device: torch.device) -> str:
    """nccl for GPUs, gloo for the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(requested_device: str) -> DistEnv:
    """Join the job's process group (creating a single-process one when alone)."""
    import deepspeed  # deliberately lazy (start-up time): sampling uses this module's device choice without DeepSpeed

    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = env_world_size()
    if world_size == 1:
        # DeepSpeed always wants a process group; a lone process gets one on a free local port.
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    device = choose_device(requested_device, local_rank)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend_for(device), verbose=False)
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def shutdown() -> None:
    """Tear the process group down explicitly: leaving it to interpreter exit can abort."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over all ranks (a no-op when alone)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
