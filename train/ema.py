"""Exponential moving average of the weights, sharded like the training state.

Each rank keeps the average of the parameters it owns, in fp32, and updates it from values it
already holds, so the update gathers nothing:
- without pipeline stages, rank r owns chunk r of every parameter (its flattened elements
  ``r·c : (r+1)·c``, ``c`` = the parameter's partition size). Under ZeRO-3 that chunk is exactly
  the partition the rank holds (``ds_tensor``); under ZeRO 0-2, where every rank holds whole
  parameters, it is read from them;
- in a pipeline, a rank owns the parameters of its stage.
The shards are checkpointed per rank (``flowmill.weights``) and put together into a whole model
only where one is needed: evaluation and samples during training (``averaged``, for the duration
of the evaluation), and sampling, export and ``load_model`` after it, on one process.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from flowmill.train.distributed import DistEnv
from flowmill.train.engine import unwrapped_name
from flowmill.weights import BUFFERS, PARAMS, Layout, consolidate

NUM_UPDATES, LAYOUT = "num_updates", "layout"


def owned_range(param: nn.Parameter, rank: int, world_size: int) -> tuple[int, int, int]:
    """(start, end, numel) of the flattened elements of ``param`` that ``rank`` owns."""
    numel = param.ds_numel if hasattr(param, "ds_tensor") else param.numel()
    size = param.ds_tensor.numel() if hasattr(param, "ds_tensor") else math.ceil(numel / world_size)
    start = min(rank * size, numel)
    return start, min(start + size, numel), numel


class EMA:
    """EMA weights with a warm-up: decay_t = min(decay, (1 + t) / (10 + t)).

    ``model`` is the plain model whose parameters the engine trains (ZeRO-3: partitioned);
    ``local``, in a pipeline, the ids of the parameters of this rank's stage.
    """

    def __init__(self, model: nn.Module, env: DistEnv, decay: float, warmup: bool = True,
                 local: set[int] | None = None, device: torch.device | None = None):
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.env = env
        self.pipeline = local is not None
        self.layout: Layout = {}
        self.shards: dict[str, torch.Tensor] = {}
        self.sources: dict[str, Callable[[], torch.Tensor]] = {}
        for wrapped_name, param in model.named_parameters():
            name = unwrapped_name(wrapped_name)
            if self.pipeline and id(param) not in local:
                continue
            start, end, numel = (0, param.numel(), param.numel()) if self.pipeline else owned_range(param, env.rank, env.world_size)
            if end <= start:
                continue
            self.layout[name] = (start, end, numel, tuple(getattr(param, "ds_shape", param.shape)))
            self.sources[name] = self._source(param, start, end)
            self.shards[name] = self.sources[name]().detach().float().clone().to(device or param.device)
        persistent = set(model.state_dict())  # non-persistent buffers are rebuilt by the model itself
        self.buffers = {unwrapped_name(name): buffer.detach().clone() for name, buffer in model.named_buffers()
                        if unwrapped_name(name) in persistent}

    @staticmethod
    def _source(param: nn.Parameter, start: int, end: int) -> Callable[[], torch.Tensor]:
        """The live values of the owned elements, without communication."""
        if hasattr(param, "ds_tensor"):
            return lambda: param.ds_tensor.data.view(-1)[: end - start]
        return lambda: param.data.view(-1)[start:end]

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, live: nn.Module) -> None:
        """Move the average toward the live weights this rank owns (every rank, no collective)."""
        weight = 1 - self.current_decay()
        for name, shard in self.shards.items():
            shard.lerp_(self.sources[name]().float().to(shard.device), weight)
        # Buffers (e.g. BatchNorm running statistics) are averages already: copied as they are.
        for wrapped_name, buffer in live.named_buffers():
            name = unwrapped_name(wrapped_name)
            if name in self.buffers and self.buffers[name].shape == buffer.shape:
                self.buffers[name].copy_(buffer)
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard: ``params/<name>`` and ``buffers/<name>`` tensors, the layout, num_updates."""
        return {
            NUM_UPDATES: self.num_updates,
            LAYOUT: {name: [start, end, numel, list(shape)] for name, (start, end, numel, shape) in self.layout.items()},
            **{PARAMS + name: shard for name, shard in self.shards.items()},
            **{BUFFERS + name: buffer for name, buffer in self.buffers.items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """This rank's own shard, saved by this rank on the same world size."""
        saved = {name: tuple(entry[:3]) for name, entry in state[LAYOUT].items()}
        mine = {name: (start, end, numel) for name, (start, end, numel, _) in self.layout.items()}
        if saved != mine:
            raise ValueError("the saved EMA shard covers other elements than this rank owns")
        self.num_updates = int(state[NUM_UPDATES])
        for name, shard in self.shards.items():
            shard.copy_(state[PARAMS + name])
        self._load_buffers({key.removeprefix(BUFFERS): value for key, value in state.items() if key.startswith(BUFFERS)})

    @torch.no_grad()
    def load_resharded(self, states: list[dict[str, Any]], step: int) -> None:
        """The shards of every rank of a job of another world size, cut anew for this rank: exact."""
        whole = consolidate(states)
        self.num_updates = int(states[0][NUM_UPDATES])
        for name, (start, end, _, _) in self.layout.items():
            self.shards[name].copy_(whole[name].view(-1)[start:end])
        self._load_buffers(whole)

    def _load_buffers(self, saved: dict[str, torch.Tensor]) -> None:
        for name, buffer in self.buffers.items():
            if name in saved:
                buffer.copy_(saved[name])

    def whole(self) -> dict[str, torch.Tensor]:
        """The whole averaged state dict, on every rank (collective: every rank calls it)."""
        states = [None] * self.env.world_size
        mine = {key: value.cpu() if isinstance(value, torch.Tensor) else value for key, value in self.state_dict().items()}
        if self.env.world_size == 1:
            return consolidate([mine])
        dist.all_gather_object(states, mine)
        return consolidate(states)

    @contextmanager
    def averaged(self, model: nn.Module) -> Iterator[nn.Module]:
        """A whole model holding the averaged weights, in eval mode, on every rank (collective).

        It is a new instance of ``model``'s class built from ``model.config`` (flowmill's models
        are), so it carries none of the engine's wrappers or hooks, and lives for the block only.
        """
        averaged = type(model)(model.config).float().eval().requires_grad_(False)
        averaged.load_state_dict(self.whole(), strict=True)
        yield averaged.to(next(model.parameters()).device)
