"""Exponential moving average of a model's weights, kept as a plain fp32 module copy.

The copy is a complete model on every rank (also under ZeRO-3, where the live weights are
gathered for the update), so samples and exports read it directly.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext

import deepspeed
import torch
import torch.distributed as dist
from torch import nn

NUM_UPDATES = "num_updates"  # beside the weights in the state dict; no model has a tensor of that name


class EMA:
    """EMA weights with a warm-up: decay_t = min(decay, (1 + t) / (10 + t))."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.module = copy.deepcopy(model).float().eval().requires_grad_(False)

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, live: nn.Module, zero_stage: int = 0, local: set[int] | None = None) -> None:
        """Move the average toward ``live``'s current weights (call on every rank).

        ``local``: ids of the parameters this rank trains (its pipeline stage); the others
        are left alone here and filled in by ``sync_stages``.
        """
        decay = self.current_decay()
        pairs = [(avg, p) for avg, p in zip(self.module.parameters(), live.parameters()) if local is None or id(p) in local]
        gather = nullcontext()
        if zero_stage == 3:
            gather = deepspeed.zero.GatheredParameters([p for _, p in pairs], modifier_rank=None)
        with gather:
            for avg, param in pairs:
                avg.lerp_(param.detach().float(), 1 - decay)
        # Buffers (e.g. BatchNorm running statistics) are averages already: copied as they are.
        buffers = dict(self.module.named_buffers())
        for name, buffer in live.named_buffers():
            if name in buffers and buffers[name].shape == buffer.shape:
                buffers[name].copy_(buffer)
        self.num_updates += 1

    @torch.no_grad()
    def sync_stages(self, live: nn.Module, local: set[int]) -> None:
        """Pipeline runs: gather every stage's share of the average onto every rank (collective)."""
        names = [name for name, p in live.named_parameters() if id(p) in local]
        mine = {name: tensor for name, tensor in self.module.named_parameters() if name in names}
        shares = [None] * dist.get_world_size()
        dist.all_gather_object(shares, {name: tensor.cpu() for name, tensor in mine.items()})
        params = dict(self.module.named_parameters())
        for share in shares:
            for name, tensor in share.items():
                params[name].copy_(tensor)

    def state_dict(self) -> dict:
        """The averaged weights (the model's own names) and ``num_updates``, one flat mapping."""
        return {**self.module.state_dict(), NUM_UPDATES: self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        weights = dict(state)
        self.num_updates = int(weights.pop(NUM_UPDATES))
        self.module.load_state_dict(weights)
