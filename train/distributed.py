"""Process-group setup and the one place where the device is chosen.

A process learns its place in the job from whichever launcher started it (``place_of``):
- torchrun, ``flowmill launch`` and flowmill's SLURM jobs set RANK, LOCAL_RANK, WORLD_SIZE,
  MASTER_ADDR and MASTER_PORT;
- a plain ``srun`` step sets SLURM_PROCID, SLURM_LOCALID, SLURM_STEP_NUM_TASKS and its node
  list: the first node leads, on a port derived from the job and step ids, so every task
  finds it without talking first;
- ``mpirun`` (Open MPI) sets OMPI_COMM_WORLD_*; the leader's address comes from MASTER_ADDR.
A process with none of them is alone (world size 1).

Where the job meets. Torch's TCPStore, the unauthenticated key-value store the ranks meet in,
listens on every interface whatever host it is given. So flowmill makes it itself (``job_store``):
rank 0 listens on the address the leader's name resolves to (MASTER_ADDR, the first node of an
``srun`` step), a lone process on 127.0.0.1. Processes of torchrun and ``flowmill launch local``
meet in the store their agent hosts (on loopback for ``flowmill launch local``).
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

# submitit's parser of SLURM node lists (n[1-3,5],gpu-a1): what its own job environment uses.
from submitit.slurm.slurm import _parse_node_list as parse_node_list
from torch.distributed import distributed_c10d

from flowmill.errors import UsageError

MASTER_PORT_BASE = 20000  # rendezvous ports are MASTER_PORT_BASE + job id % MASTER_PORT_SPAN
MASTER_PORT_SPAN = 10000  # below Linux's ephemeral range (32768+), so no client socket holds the port
DEFAULT_MASTER_PORT = 29500  # torchrun's default, for mpirun jobs that name no port
LOOPBACK = "127.0.0.1"  # where a job that runs on this machine alone listens
AGENT_STORE_ENV = "TORCHELASTIC_USE_AGENT_STORE"  # "True" when a torch elastic agent hosts the job's store

log = logging.getLogger("flowmill")


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
            # Not a UsageError: on a cluster it is the node's state (a lost GPU), which a retry may not meet.
            raise RuntimeError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu or auto")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def placement(requested: str, weights: torch.device, key: str) -> torch.device:
    """Where state kept beside the weights goes: ``auto`` beside them, or ``cpu``/``cuda``;
    ``cuda`` without a GPU is an error naming ``key``."""
    if requested == "auto":
        return weights
    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{key}: cuda, but no CUDA device is visible; use {key}=cpu or auto")
    return weights if requested == weights.type else torch.device(requested)


def backend_for(device: torch.device) -> str:
    """nccl for GPUs, gloo for the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


@dataclass(frozen=True)
class Place:
    """Where a process sits, as its launcher told it; ``process_group_env`` in torch's terms."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun (also flowmill launch and flowmill's SLURM jobs) | srun | mpirun | alone

    def process_group_env(self) -> dict[str, str]:
        return {
            "RANK": str(self.rank), "LOCAL_RANK": str(self.local_rank), "WORLD_SIZE": str(self.world_size),
            "LOCAL_WORLD_SIZE": str(self.local_world_size), "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def rendezvous_port(job_id: str, step_id: str = "0") -> int:
    """The leader's port of a SLURM job (step): the same on every task and every attempt of the job."""
    return MASTER_PORT_BASE + (int(job_id) + int(step_id or 0)) % MASTER_PORT_SPAN


def place_of(environ: Mapping[str, str]) -> Place:
    """This process's place, read from ``environ`` (see the module docstring)."""
    if "RANK" in environ:
        world_size = int(environ.get("WORLD_SIZE", "1"))
        return Place(int(environ["RANK"]), int(environ.get("LOCAL_RANK", "0")), world_size,
                     int(environ.get("LOCAL_WORLD_SIZE", world_size)), environ.get("MASTER_ADDR", "127.0.0.1"),
                     int(environ.get("MASTER_PORT", DEFAULT_MASTER_PORT)), "torchrun")
    if "SLURM_STEP_NUM_TASKS" in environ and "SLURM_PROCID" in environ:
        return srun_place(environ)
    if "OMPI_COMM_WORLD_RANK" in environ:
        world_size = int(environ["OMPI_COMM_WORLD_SIZE"])
        if world_size > 1 and "MASTER_ADDR" not in environ:
            raise UsageError("MASTER_ADDR: Open MPI does not say which host leads the job; export it to every "
                             "process (mpirun -x MASTER_ADDR=<first host> -x MASTER_PORT=<port>)")
        return Place(int(environ["OMPI_COMM_WORLD_RANK"]), int(environ.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")),
                     world_size, int(environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", world_size)),
                     environ.get("MASTER_ADDR", "127.0.0.1"), int(environ.get("MASTER_PORT", DEFAULT_MASTER_PORT)),
                     "mpirun")
    return Place(0, 0, 1, 1, "127.0.0.1", 0, "alone")


def srun_place(environ: Mapping[str, str]) -> Place:
    """The place of a task of a plain ``srun`` step; UsageError when its tasks do not fill its nodes evenly."""
    tasks, nodes = int(environ["SLURM_STEP_NUM_TASKS"]), int(environ.get("SLURM_STEP_NUM_NODES", "1"))
    if tasks < nodes or tasks % nodes:
        raise UsageError(f"SLURM_STEP_NUM_TASKS: {tasks} tasks do not spread evenly over SLURM_STEP_NUM_NODES={nodes} "
                         "nodes; ask srun for the same number of tasks on every node (--ntasks-per-node)")
    node_list = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST", "")
    hosts = parse_node_list(node_list) if node_list else ["127.0.0.1"]
    port = rendezvous_port(environ.get("SLURM_JOB_ID", "0"), environ.get("SLURM_STEP_ID", "0"))
    return Place(int(environ["SLURM_PROCID"]), int(environ.get("SLURM_LOCALID", "0")), tasks, tasks // nodes,
                 hosts[0], port, "srun")


def init_distributed(requested_device: str, timeout_min: float | None = None) -> DistEnv:
    """Join the job's process group (creating a single-process one when alone).

    ``timeout_min``: how long a collective waits for a rank that stopped answering before it fails.
    """
    import deepspeed  # deliberately lazy (start-up time): sampling uses this module's device choice without DeepSpeed

    place = place_of(os.environ)
    timeout = datetime.timedelta(minutes=timeout_min) if timeout_min else None
    store = None
    if not dist.is_initialized():
        # DeepSpeed always wants a process group, so a lone process makes one too.
        store = job_store(place, os.environ, timeout or distributed_c10d.default_pg_timeout)
    if place.launcher == "alone":
        place = Place(0, 0, 1, 1, LOOPBACK, store.port if store is not None else free_port(), "alone")
    os.environ.update(place.process_group_env())
    device = choose_device(requested_device, place.local_rank)
    if not dist.is_initialized():
        if timeout:
            # DeepSpeed makes process groups of its own (data parallel, pipeline stages) without a
            # timeout, and torch gives such groups its module defaults: make those ours too.
            distributed_c10d.default_pg_timeout = distributed_c10d.default_pg_nccl_timeout = timeout
        if store is not None:  # DeepSpeed takes a group that exists as it is
            dist.init_process_group(backend_for(device), store=store, rank=place.rank, world_size=place.world_size,
                                    **({"timeout": timeout} if timeout else {}))
        deepspeed.init_distributed(dist_backend=backend_for(device), verbose=False,
                                   **({"timeout": timeout} if timeout else {}))
    return DistEnv(rank=place.rank, local_rank=place.local_rank, world_size=place.world_size, device=device)


def shutdown(clean: bool = True) -> None:
    """Tear the process group down explicitly: leaving it to interpreter exit can abort.

    After a failure the other ranks may never arrive, so only a clean ending waits for them.
    """
    if dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def loopback_interface() -> str | None:
    """The name of this machine's loopback network interface (``lo`` on Linux, ``lo0`` on macOS), or None."""
    return next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)


def loopback_store(port: int = 0, timeout_s: float = 300.0) -> dist.TCPStore:
    """A TCPStore server reachable from this machine only (``listening_store`` on 127.0.0.1).
    ``port`` 0: any free port (the store's ``port`` says which)."""
    return listening_store(LOOPBACK, port, datetime.timedelta(seconds=timeout_s))


def listening_store(address: str, port: int, timeout: datetime.timedelta) -> dist.TCPStore:
    """A TCPStore server listening on the IP ``address`` only. Torch's TCPStore listens on every
    interface whatever host it is given, and it answers anyone unauthenticated; handed a socket
    that already listens on one address, it listens there instead."""
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(socket.SOMAXCONN)
        port = sock.getsockname()[1]
        # The store owns the socket from here on (and closes it).
        return dist.TCPStore(address, port, is_master=True, multi_tenant=True, master_listen_fd=sock.detach(),
                             wait_for_workers=False, timeout=timeout)
    finally:
        sock.close()


def job_store(place: Place, environ: Mapping[str, str], timeout: datetime.timedelta) -> dist.TCPStore | None:
    """The store the processes of the job meet in, listening only where it must (see the module
    docstring); None when torch's own rendezvous is to join the store a torch elastic agent hosts.

    Rank 0 listens on the address the leader's name resolves to. When that is a loopback address
    although the job spans several nodes (a node whose /etc/hosts maps its own name to 127.0.1.1),
    the other nodes could not reach it there: it listens on every interface, as torch would, and
    says so. The other ranks connect to it."""
    if place.launcher == "alone":
        return loopback_store(0, timeout.total_seconds())
    if environ.get(AGENT_STORE_ENV) == "True":
        return None
    if place.rank != 0:
        return dist.TCPStore(place.master_addr, place.master_port, is_master=False, timeout=timeout)
    address = socket.getaddrinfo(place.master_addr, place.master_port, type=socket.SOCK_STREAM)[0][4][0]
    if ipaddress.ip_address(address).is_loopback and place.world_size > place.local_world_size:
        log.warning("the job's leader %s resolves to %s on its own node, which the other nodes cannot reach there; its "
                    "rendezvous store listens on every interface instead (make %s resolve to the address the other "
                    "nodes reach, or give that address as MASTER_ADDR where the launcher reads it)",
                    place.master_addr, address, place.master_addr)
        return dist.TCPStore(place.master_addr, place.master_port, is_master=True, multi_tenant=True,
                             wait_for_workers=False, timeout=timeout)
    return listening_store(address, place.master_port, timeout)


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
