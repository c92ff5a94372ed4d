"""The sharded EMA: each rank averages what it owns; shards put together equal one whole average."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from flowmill.train.distributed import DistEnv
from flowmill.train.ema import EMA
from flowmill.weights import consolidate, load_flat, save_flat


def env(rank: int, world_size: int) -> DistEnv:
    return DistEnv(rank=rank, local_rank=rank, world_size=world_size, device=torch.device("cpu"))


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Linear(5, 2))


def step(live: nn.Module, seed: int) -> None:
    """A stand-in for an optimizer step: move every weight, and BatchNorm's running statistics."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in live.parameters():
            param.add_(torch.randn(param.shape, generator=generator))
    live.train()(torch.randn(8, 3, generator=generator))


def test_one_rank_averages_every_parameter_and_copies_buffers():
    live = model()
    start = live[0].weight.detach().clone()
    ema = EMA(live, env(0, 1), decay=0.5, warmup=False)
    with torch.no_grad():
        live[0].weight.add_(1.0)
    live.train()(torch.randn(16, 3))
    ema.update(live)
    whole = ema.whole()
    torch.testing.assert_close(whole["0.weight"], start + 0.5)
    # Running statistics are averages already: the EMA keeps the live ones.
    assert torch.equal(whole["1.running_mean"], live[1].running_mean)
    assert whole["1.num_batches_tracked"].item() == 1
    averaged = model(seed=1)
    averaged.load_state_dict(whole)  # the whole state is the plain model's state dict


def test_shards_of_two_ranks_put_together_equal_one_whole_average():
    live = model()
    alone = EMA(live, env(0, 1), decay=0.9)
    ranks = [EMA(live, env(rank, 2), decay=0.9) for rank in (0, 1)]
    assert all(len(ranks[0].shards[name]) + len(ranks[1].shards[name]) == len(alone.shards[name]) for name in alone.shards)
    for seed in range(3):
        step(live, seed)
        for ema in (alone, *ranks):
            ema.update(live)
    whole = consolidate([ema.state_dict() for ema in ranks])
    for name, tensor in alone.whole().items():
        assert torch.equal(whole[name], tensor), name


def test_resharding_2_to_3_to_2_is_exact():
    live = model()
    two = [EMA(live, env(rank, 2), decay=0.9) for rank in (0, 1)]
    for seed in range(2):
        step(live, seed)
        for ema in two:
            ema.update(live)
    saved = [ema.state_dict() for ema in two]
    three = [EMA(model(seed=5), env(rank, 3), decay=0.9) for rank in range(3)]
    for ema in three:
        ema.load_resharded(saved, step=2)
    back = [EMA(model(seed=6), env(rank, 2), decay=0.9) for rank in (0, 1)]
    for ema in back:
        ema.load_resharded([e.state_dict() for e in three], step=2)
    original, round_trip = consolidate(saved), consolidate([ema.state_dict() for ema in back])
    assert original.keys() == round_trip.keys()
    assert all(torch.equal(original[name], round_trip[name]) for name in original)
    assert all(ema.num_updates == 2 for ema in (*three, *back))


def test_a_pipeline_stage_owns_its_own_parameters_whole():
    live = model()
    stage = {id(p) for p in live[2].parameters()}
    ema = EMA(live, env(1, 2), decay=0.9, local=stage)
    assert set(ema.layout) == {"2.weight", "2.bias"}
    assert ema.layout["2.weight"] == (0, 10, 10, (2, 5))


def test_a_saved_shard_loads_back_exactly(tmp_path):
    live = model()
    ema = EMA(live, env(1, 2), decay=0.9)
    step(live, 0)
    ema.update(live)
    save_flat(ema.state_dict(), tmp_path / "shard.safetensors")
    restored = EMA(model(seed=3), env(1, 2), decay=0.9)
    restored.load_state_dict(load_flat(tmp_path / "shard.safetensors"))
    assert restored.num_updates == 1
    assert all(torch.equal(restored.shards[name], ema.shards[name]) for name in ema.shards)


@dataclass
class TinyConfig:
    width: int = 5


class Tiny(nn.Module):
    """A model built from its config, as flowmill's models are."""

    def __init__(self, config: TinyConfig):
        super().__init__()
        self.config = config
        self.layers = nn.Sequential(nn.Linear(3, config.width), nn.BatchNorm1d(config.width), nn.Linear(config.width, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def test_averaged_gives_a_whole_model_in_eval_mode_and_leaves_the_live_one_alone():
    live = Tiny(TinyConfig())
    ema = EMA(live, env(0, 1), decay=0.0, warmup=False)
    step(live, 0)
    ema.update(live)  # decay 0: the average is the live weights
    before = [p.detach().clone() for p in live.parameters()]
    with ema.averaged(live) as averaged:
        assert averaged is not live and not averaged.training
        assert all(torch.equal(p, q) for p, q in zip(averaged.parameters(), before))
    assert all(torch.equal(p, q) for p, q in zip(live.parameters(), before)) and live.training
