"""Evaluation on every rank: each rank scores its share of the held-out set; the sums are reduced.

A rank left waiting while another evaluates alone hits the process-group timeout at scale, so
every rank evaluates. A metric is a mean, accumulated as a sum and a count (``Totals``), so the
reduced figure equals a single-process evaluation of the same set up to float rounding.

Two rules keep the figures independent of how the set is split:
- Random draws never depend on the split: a task either draws the noise of the whole held-out
  set from one seeded generator and takes its rows, or gives every item its own stream
  (``item_generators``: seeded from the evaluation seed and the item's index).
- The training loop evaluates a whole model on every rank (``Job.eval_model``, also under
  ZeRO-3), so a rank with a smaller or empty share just makes fewer forward calls.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from flowmill.train.distributed import DistEnv

ITEM_SEED_STRIDE = 2_654_435_761  # spreads evaluation seeds apart; torch keeps 32 bits of a CPU seed


def share(count: int, env: DistEnv) -> slice:
    """The contiguous block of ``count`` held-out items that this rank scores (possibly empty)."""
    per_rank = math.ceil(count / env.world_size)
    start = min(env.rank * per_rank, count)
    return slice(start, min(start + per_rank, count))


def alone(env: DistEnv) -> DistEnv:
    """``env`` as a job of one: for work one rank does by itself (rank 0's samples of a whole model)."""
    return DistEnv(rank=0, local_rank=env.local_rank, world_size=1, device=env.device)


@dataclass(frozen=True)
class Chunk:
    """The held-out items of one forward pass."""

    items: range  # indices into the held-out set

    @property
    def rows(self) -> slice:
        return slice(self.items.start, self.items.stop)


def eval_chunks(count: int, size: int, env: DistEnv) -> list[Chunk]:
    """This rank's share of ``count`` items in passes of at most ``size`` items."""
    if size < 1:
        raise ValueError(f"a pass holds at least one item, got size {size}")
    mine = share(count, env)
    return [Chunk(range(start, min(start + size, mine.stop))) for start in range(mine.start, mine.stop, size)]


def item_generators(seed: int, items: Iterable[int]) -> list[torch.Generator]:
    """One CPU generator per held-out item, seeded from ``seed`` and the item's index: an item's
    draws are the same whichever rank scores it and whatever else shares its pass."""
    return [torch.Generator().manual_seed((seed * ITEM_SEED_STRIDE + index) % 2**32) for index in items]


def item_normal(generators: Sequence[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    """N(0, 1) draws (len(generators), *shape), float32 on the CPU: row i from generator i."""
    if not generators:
        return torch.empty((0, *shape))
    return torch.stack([torch.randn(shape, generator=generator) for generator in generators])


class ItemStreams:
    """The random streams of held-out items under one seed, each continued where it was left."""

    def __init__(self, seed: int):
        self.seed = seed
        self.streams: dict[int, torch.Generator] = {}

    def of(self, chunk: Chunk) -> list[torch.Generator]:
        """The streams of the chunk's items."""
        for index in chunk.items:
            if index not in self.streams:
                self.streams[index] = item_generators(self.seed, [index])[0]
        return [self.streams[index] for index in chunk.items]


def take(batch: dict, rows: slice) -> dict:
    """The rows ``rows`` of a batch of tensors and lists (other values as they are)."""
    return {key: value[rows] if isinstance(value, (torch.Tensor, list, tuple)) else value for key, value in batch.items()}


class Totals:
    """Sums and counts of the metrics of this rank's share; ``reduced`` gives the means over all ranks.

    Keys named up front are reduced even where this rank added none (an empty share); every
    rank must otherwise add the same keys.
    """

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self.sums: dict[str, float] = {key: 0.0 for key in keys}
        self.counts: dict[str, float] = {key: 0.0 for key in self.sums}

    def add(self, key: str, total: float | torch.Tensor, count: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float(total)
        self.counts[key] = self.counts.get(key, 0.0) + float(count)

    def reduced(self, env: DistEnv | None = None) -> dict[str, float]:
        """``{key: sum over ranks / count over ranks}`` (NaN for a key nobody counted).

        Collective over the process group, or over ``env``'s ranks when given (none for a job of one).
        """
        keys = sorted(self.sums)
        values = torch.tensor([self.sums[k] for k in keys] + [self.counts[k] for k in keys], dtype=torch.float64)
        together = env.world_size > 1 if env is not None else dist.is_initialized() and dist.get_world_size() > 1
        if together:
            values = values.to(collective_device(env))
            dist.all_reduce(values)
            values = values.cpu()
        sums, counts = values[: len(keys)], values[len(keys):]
        return {key: (total / count).item() if count > 0 else math.nan for key, total, count in zip(keys, sums, counts)}


def collective_device(env: DistEnv | None) -> torch.device:
    """Where a collective's tensors live: the GPU under NCCL, else the CPU."""
    if dist.get_backend() != "nccl":
        return torch.device("cpu")
    return env.device if env is not None else torch.device("cuda", torch.cuda.current_device())


def gather_rows(rows: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Every rank's ``rows`` (n_r, ...) concatenated in rank order, on every rank, on the CPU (collective
    over ``env``'s ranks). The trailing shape and dtype must agree; a rank may give none."""
    if env.world_size == 1:
        return rows.cpu()
    device = collective_device(env)
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(env.world_size)]
    dist.all_gather(counts, torch.tensor([len(rows)], device=device))
    most = max(int(count) for count in counts)
    padded = torch.zeros((most, *rows.shape[1:]), dtype=rows.dtype, device=device)
    padded[: len(rows)] = rows.to(device)
    parts = [torch.empty_like(padded) for _ in range(env.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(count)] for part, count in zip(parts, counts)]).cpu()
