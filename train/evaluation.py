"""Evaluation on every rank: each rank scores its share of the held-out set; the sums are reduced.

A rank left waiting while another evaluates alone hits the process-group timeout at scale, so
every rank evaluates. A metric is a mean, accumulated as a sum and a count (``Totals``), so the
reduced figure equals a single-process evaluation of the same set up to float rounding.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from flowmill.train.distributed import DistEnv


def share(count: int, env: DistEnv) -> slice:
    """The contiguous block of ``count`` held-out items that this rank scores (possibly empty)."""
    per_rank = math.ceil(count / env.world_size)
    start = min(env.rank * per_rank, count)
    return slice(start, min(start + per_rank, count))


class Totals:
    """Sums and counts of the metrics of this rank's share; ``reduced`` gives the means over all ranks.

    Every rank must add the same keys (a rank with an empty share adds zeros).
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}

    def add(self, key: str, total: float | torch.Tensor, count: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float(total)
        self.counts[key] = self.counts.get(key, 0.0) + float(count)

    def reduced(self) -> dict[str, float]:
        """``{key: sum over ranks / count over ranks}`` (collective when there is a process group)."""
        keys = sorted(self.sums)
        values = torch.tensor([self.sums[k] for k in keys] + [self.counts[k] for k in keys], dtype=torch.float64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(values)
        sums, counts = values[: len(keys)], values[len(keys):]
        return {key: (total / count).item() if count > 0 else math.nan for key, total, count in zip(keys, sums, counts)}
