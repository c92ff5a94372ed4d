"""Weights a checkpoint holds in shards, put back together on one process without a process group.

Every rank of a job saves the EMA of the parameters it owns as ``ema-rank-RRRRR.safetensors``:
one tensor per owned parameter (``params/<name>``: elements ``start:end`` of the flattened
parameter), the model's buffers (``buffers/<name>``), and in the metadata the ``layout``
(``name -> [start, end, numel, shape]``) and ``num_updates``. ``consolidate`` puts the shards of
all ranks back into whole tensors.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

from flowmill.errors import UsageError
from flowmill.run_dir import Checkpoint

PARAMS, BUFFERS = "params/", "buffers/"
EMA_SHARDS = "ema-rank-*.safetensors"

Layout = dict[str, tuple[int, int, int, tuple[int, ...]]]  # name -> (start, end, numel, shape)


def save_flat(state: Mapping[str, Any], path: Path) -> None:
    """A flat state dict as safetensors: tensors in the body, other values (JSON) in the metadata."""
    tensors = {key: value.detach().contiguous() for key, value in state.items() if isinstance(value, torch.Tensor)}
    metadata = {key: json.dumps(value) for key, value in state.items() if not isinstance(value, torch.Tensor)}
    save_file(tensors, path, metadata=metadata)


def load_flat(path: Path) -> dict[str, Any]:
    """What ``save_flat`` wrote."""
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata() or {}
    return {**load_file(path), **{key: json.loads(value) for key, value in metadata.items()}}


def consolidate(states: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """The whole weights (and buffers) that the shard states of all ranks hold, by parameter name.

    Ranks that hold the same range (the replicas of a pipeline stage) hold the same values.
    """
    whole: dict[str, torch.Tensor] = {}
    for state in states:
        for name, (start, end, numel, shape) in state["layout"].items():
            if name not in whole:
                whole[name] = torch.empty(numel, dtype=torch.float32)
            whole[name][start:end] = state[PARAMS + name].float()
        for key, value in state.items():
            if key.startswith(BUFFERS):
                whole.setdefault(key.removeprefix(BUFFERS), value)
    layouts = [state["layout"] for state in states]
    for name, tensor in list(whole.items()):
        shape = next((layout[name][3] for layout in layouts if name in layout), None)
        if shape is not None:
            whole[name] = tensor.view(tuple(shape))
    return whole


def has_ema(checkpoint: Checkpoint) -> bool:
    """Whether the checkpoint holds EMA weights (not with ``ema.enabled=false``)."""
    return any(checkpoint.path.glob(EMA_SHARDS))


def read_ema(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """The whole EMA weights of a checkpoint (its model's state dict), from every rank's shard."""
    files = sorted(checkpoint.path.glob(EMA_SHARDS))
    if not files:
        raise UsageError(f"{checkpoint.path} holds no EMA weights (the run trained with ema.enabled=false); "
                         "use its trained weights, e.g. `flowmill export sd3 RUN --live`")
    return consolidate([load_flat(path) for path in files])


def weights_sha256(weights: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a state dict's serialization (safetensors, keys sorted): the same weights, the same hash."""
    return hashlib.sha256(save({key: weights[key].contiguous() for key in sorted(weights)})).hexdigest()
