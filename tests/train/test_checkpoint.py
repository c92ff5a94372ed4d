"""The checkpoint manager: every piece saved and restored by name, without DeepSpeed (a stand-in engine)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from flowmill.run_dir import RunDir
from flowmill.train.checkpoint import CheckpointManager, GlobalRNG, NoiseStream
from flowmill.train.distributed import DistEnv
from flowmill.train.ema import EMA
from flowmill.weights import load_flat, read_ema, save_flat


class StandInEngine:
    """Saves and loads one file per rank, as DeepSpeed's engine does for its own state."""

    def __init__(self, rank: int):
        self.rank = rank
        self.weight = torch.zeros(3)

    def save_checkpoint(self, root, tag, client_state, save_latest):
        (Path(root) / tag).mkdir(parents=True, exist_ok=True)
        torch.save(self.weight, Path(root) / tag / f"engine-{self.rank}.pt")

    def load_checkpoint(self, root, tag):
        self.weight = torch.load(f"{root}/{tag}/engine-{self.rank}.pt")
        return f"{root}/{tag}", {}


class Position:
    """A per-rank piece that records how it was restored."""

    def __init__(self, value: int):
        self.value = value
        self.resharded_from: list[dict] | None = None

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]

    def load_resharded(self, states, step):
        self.resharded_from, self.value = states, -step


def manager(run: RunDir, rank: int, world_size: int, keep_last: int = 0, position: int = 0, ema: EMA | None = None):
    env = DistEnv(rank=rank, local_rank=rank, world_size=world_size, device=torch.device("cpu"))
    ema = ema or EMA(nn.Linear(2, 2), env, decay=0.5)
    return CheckpointManager(run, keep_last, env, StandInEngine(rank), per_rank={"position": Position(position)},
                             sharded={"ema": ema})


def make_run(tmp_path) -> RunDir:
    run = RunDir(tmp_path / "run")
    run.create({"task": "mmdit"})
    return run


def test_save_writes_every_piece_by_name_then_marks_the_checkpoint_complete(tmp_path):
    run = make_run(tmp_path)
    ema = EMA(nn.Linear(2, 2), DistEnv(0, 0, 1, torch.device("cpu")), decay=0.5)
    ema.update(nn.Linear(2, 2))
    checkpoint = manager(run, 0, 1, position=5, ema=ema).save(3, meta={"task": "mmdit", "global_batch": 8})
    assert run.latest().path == checkpoint.path
    assert checkpoint.meta == {"task": "mmdit", "global_batch": 8, "step": 3, "world_size": 1}
    assert torch.load(checkpoint.rank_file(0), weights_only=False) == {"position": {"value": 5}}
    assert load_flat(checkpoint.path / "ema-rank-00000.safetensors")["num_updates"] == 1
    # Put together, the EMA shards are the model's state dict: loadable into the model as it is.
    nn.Linear(2, 2).load_state_dict(read_ema(checkpoint))


def test_load_restores_every_piece_on_the_same_world_size(tmp_path):
    run = make_run(tmp_path)
    saving = manager(run, 0, 1, position=5)
    saving.engine.weight = torch.ones(3)
    saving.sharded["ema"].update(nn.Linear(2, 2))
    saving.save(3, meta={})
    restoring = manager(run, 0, 1)
    assert restoring.load() == 3
    assert restoring.per_rank["position"].value == 5 and restoring.per_rank["position"].resharded_from is None
    assert torch.equal(restoring.engine.weight, torch.ones(3))
    assert restoring.sharded["ema"].num_updates == 1
    assert all(torch.equal(restoring.sharded["ema"].shards[n], t) for n, t in saving.sharded["ema"].shards.items())


def test_another_world_size_reshards_from_every_saving_rank(tmp_path):
    run = make_run(tmp_path)
    for rank in (0, 1):  # one after the other: the barriers between ranks are no-ops here
        manager(run, rank, 2, position=10 + rank).save(4, meta={})
    alone = manager(run, 0, 1)
    alone.engine.rank = 0
    assert alone.load() == 4
    assert alone.per_rank["position"].resharded_from == [{"value": 10}, {"value": 11}]
    assert alone.per_rank["position"].value == -4


def test_keep_last_prunes_older_complete_checkpoints(tmp_path):
    run = make_run(tmp_path)
    saving = manager(run, 0, 1, keep_last=2)
    for step in (1, 2, 3):
        saving.save(step, meta={})
    assert [p.name for p in run.step_dirs()] == ["step-00000002", "step-00000003"]


def test_a_crash_before_the_marker_leaves_latest_on_the_previous_checkpoint(tmp_path):
    run = make_run(tmp_path)
    saving = manager(run, 0, 1)
    saving.save(1, meta={})
    half = run.checkpoints / "step-00000002"
    half.mkdir()
    (half / "rank-00000.pt").write_bytes(b"partial")
    assert run.latest().step == 1
    saving.save(2, meta={})  # a later save of the same step replaces the leftover
    assert run.latest().step == 2 and json.loads((half / "flowmill.json").read_text())["step"] == 2


def test_noise_stream_and_global_rng_continue_exactly():
    noise = NoiseStream(seed=3, replica=1)
    torch.randn(4, generator=noise.generator)
    rng = GlobalRNG(seed=3, rank=0)
    saved_noise, saved_rng = noise.state_dict(), rng.state_dict()
    expected_noise, expected_global = torch.randn(4, generator=noise.generator), torch.rand(4)
    restored = NoiseStream(seed=3, replica=1)
    restored.load_state_dict(saved_noise)
    rng.load_state_dict(saved_rng)
    assert torch.equal(torch.randn(4, generator=restored.generator), expected_noise)
    assert torch.equal(torch.rand(4), expected_global)


def test_resharded_noise_streams_differ_per_replica_and_step():
    streams = [NoiseStream(seed=0, replica=r) for r in (0, 1)]
    draws = []
    for step in (10, 20):
        for stream in streams:
            stream.load_resharded([], step)
            draws.append(torch.randn(3, generator=stream.generator))
    assert all(not torch.equal(a, b) for i, a in enumerate(draws) for b in draws[i + 1:])


def test_flat_state_keeps_tensors_and_numbers(tmp_path):
    save_flat({"w": torch.arange(3.0), "count": 7, "rate": 0.5}, tmp_path / "x.safetensors")
    state = load_flat(tmp_path / "x.safetensors")
    assert torch.equal(state["w"], torch.arange(3.0)) and state["count"] == 7 and state["rate"] == 0.5
