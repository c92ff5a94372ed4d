"""Tests for flowmill.data.streams through the loader: continuing a run on another world size
(``StreamingLoader.load_resharded``) consumes each sample of the resharded epochs exactly once."""

import io
import os
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from flowmill.data.loader import StreamingLoader
from flowmill.data.pack import write_shards

POISONED = "s0004"


def decode_value(sample: dict) -> dict:
    if b"bad" in sample["txt"]:
        raise ValueError("poisoned sample")
    return {"x": torch.tensor([float(sample["cls"])]), "txt": sample["txt"].decode()}


@pytest.fixture
def dataset(tmp_path):
    """7 shards of uneven size (6 of 5 samples, one of 3), one poisoned sample; returns (folder, all keys)."""
    samples = [
        {"__key__": f"s{index:04d}", "cls": str(index), "txt": "bad" if f"s{index:04d}" == POISONED else f"text {index}"}
        for index in range(33)
    ]
    write_shards(samples, tmp_path, source="test", args={}, shard_samples=5, progress=False)
    return tmp_path, [sample["__key__"] for sample in samples]


def make(folder, rank: int, world_size: int, num_workers: int, batch_size: int = 4, **overrides) -> StreamingLoader:
    settings = dict(rank=rank, world_size=world_size, batch_size=batch_size, num_workers=num_workers, seed=3,
                    decode=decode_value, shuffle_buffer=6, resampled=True, audit=True)
    settings.update(overrides)
    return StreamingLoader(folder, **settings)


def run_old(folder, world_size: int, num_workers: int, steps: int, **settings) -> tuple[list[dict], list[StreamingLoader]]:
    """Every old rank takes ``steps`` batches (ranks step together in training); returns their states and loaders."""
    loaders = [make(folder, rank, world_size, num_workers, **settings) for rank in range(world_size)]
    for data in loaders:
        batches = iter(data)
        for _ in range(steps):
            next(batches)
        batches.close()
    return [data.state_dict() for data in loaders], loaders


def continue_new(folder, states: list[dict], world_size: int, num_workers: int, until_epoch: int,
                 **settings) -> list[StreamingLoader]:
    """Every new rank resumes from ``states`` and reads until each of its workers is past ``until_epoch``."""
    loaders = []
    for rank in range(world_size):
        data = make(folder, rank, world_size, num_workers, **settings)
        data.load_resharded(states)
        batches = iter(data)
        while min(data.worker_epochs) <= until_epoch:
            next(batches)
        batches.close()
        loaders.append(data)
    return loaders


def consumed_per_epoch(loaders: list[StreamingLoader], epochs: range) -> dict[int, Counter]:
    """Per epoch, how often each key was delivered or skipped as a bad sample by ``loaders``."""
    counts = {epoch: Counter() for epoch in epochs}
    for data in loaders:
        for entry in data.audit["delivered"] + [entry for entry in data.audit["skipped"] if entry["key"] is not None]:
            if entry["epoch"] in counts:
                counts[entry["epoch"]][entry["key"]] += 1
    return counts


def last_started_epoch(states: list[dict]) -> int:
    return max(position["epoch"] for state in states for position in state["positions"])


@pytest.mark.parametrize(
    ("old_world", "old_workers", "new_world", "new_workers", "steps"),
    [
        (2, 0, 1, 0, 3), (2, 1, 1, 2, 5), (2, 2, 1, 1, 4),  # 2 → 1
        (1, 0, 2, 2, 6), (1, 2, 2, 0, 9), (1, 1, 2, 1, 4),  # 1 → 2
        (2, 0, 3, 1, 4), (2, 2, 3, 2, 7), (2, 1, 3, 0, 2),  # 2 → 3
    ],
)
def test_every_sample_of_the_resharded_epochs_is_consumed_once(dataset, old_world, old_workers, new_world,
                                                               new_workers, steps):
    folder, keys = dataset
    states, old = run_old(folder, old_world, old_workers, steps)
    until = last_started_epoch(states)
    new = continue_new(folder, states, new_world, new_workers, until, batch_size=3)
    first = min(data.epoch for data in new)
    assert first == min(position["epoch"] for state in states for position in state["positions"])
    counts = consumed_per_epoch(old + new, range(until + 1))
    for epoch, seen in counts.items():
        assert seen == Counter(keys), f"epoch {epoch}: a key repeated or missing"
    # The new ranks start where the old ones left off: nothing of epochs before ``first``, and
    # in the resharded epochs only what the old ranks had not consumed.
    old_seen = consumed_per_epoch(old, range(until + 1))
    new_seen = consumed_per_epoch(new, range(until + 1))
    assert all(not new_seen[epoch] for epoch in range(first))
    assert all(not (old_seen[epoch] & new_seen[epoch]) for epoch in range(until + 1))
    assert sum(old_seen[first].values()) > 0, "the test should stop the old ranks mid-epoch"


def test_stats_are_shared_out_over_the_new_ranks(dataset):
    folder, _ = dataset
    states, _ = run_old(folder, 2, 1, steps=6)
    totals = Counter()
    for state in states:
        totals.update(state["stats"])
    assert totals["delivered"] == 2 * 6 * 4 and totals["skipped"] >= 1
    shares = Counter()
    for rank in range(3):
        data = make(folder, rank, 3, 0)
        data.load_resharded(states)
        shares.update(data.stats)
        assert abs(data.stats["delivered"] - totals["delivered"] / 3) < 1
    assert shares == totals


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_after_a_reshard_is_exact(dataset, num_workers):
    folder, _ = dataset
    states, _ = run_old(folder, 2, 1, steps=4)  # one old rank is in epoch 0, the other in epoch 1

    def resharded():
        data = make(folder, 1, 3, num_workers, batch_size=2)
        data.load_resharded(states)
        return data

    straight = resharded()
    full = [batch["__key__"] for batch, _ in zip(straight, range(12))]
    first = resharded()
    batches = iter(first)
    head = [next(batches)["__key__"] for _ in range(2)]
    batches.close()
    saved = first.state_dict()
    assert saved["resharded"] is not None, "the test should save inside the resharded epochs"
    resumed = make(folder, 1, 3, num_workers, batch_size=2)
    resumed.load_state_dict(saved)
    tail = [batch["__key__"] for batch, _ in zip(resumed, range(10))]
    assert head + tail == full
    assert resumed.stats == straight.stats


def test_state_forgets_the_reshard_once_past_its_epochs(dataset):
    folder, _ = dataset
    states, _ = run_old(folder, 2, 0, steps=3)
    data = make(folder, 0, 1, 0)
    data.load_resharded(states)
    batches = iter(data)
    while min(data.worker_epochs) <= last_started_epoch(states):
        next(batches)
        assert data.state_dict()["resharded"] is not None or min(data.worker_epochs) > last_started_epoch(states)
    assert data.state_dict()["resharded"] is None


def test_a_second_reshard_inside_the_epoch_still_consumes_each_sample_once(dataset):
    # 2 ranks → 1 rank (a few steps, still inside the resharded epoch) → 3 ranks.
    folder, keys = dataset
    first_states, first = run_old(folder, 2, 1, steps=2)
    middle = make(folder, 0, 1, 2)
    middle.load_resharded(first_states)
    batches = iter(middle)
    for _ in range(3):
        next(batches)
    batches.close()
    second_states = [middle.state_dict()]
    assert second_states[0]["resharded"] is not None
    until = max(last_started_epoch(first_states), last_started_epoch(second_states))
    last = continue_new(folder, second_states, 3, 1, until, batch_size=2)
    for epoch, seen in consumed_per_epoch(first + [middle] + last, range(until + 1)).items():
        assert seen == Counter(keys), f"epoch {epoch}"


def put_first(path, members: list[tuple[str, bytes]]) -> None:
    """Rewrite the tar ``path`` with ``members`` (name, bytes) before its own members."""
    with tarfile.open(path) as tar:
        members += [(member.name, tar.extractfile(member).read()) for member in tar]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_read_errors_are_reported_once_per_epoch_across_the_reshard(dataset):
    folder, _ = dataset
    shard = folder / "shard-000002.tar"
    os.truncate(shard, shard.stat().st_size // 2 + 100)
    put_first(folder / "shard-000004.tar", [("twice.cls", b"1"), ("twice.cls", b"2")])  # one field twice
    states, old = run_old(folder, 2, 1, steps=3, verify=False)
    until = last_started_epoch(states)
    new = continue_new(folder, states, 1, 2, until, verify=False)
    for epoch in range(until + 1):
        reports = [entry for data in old + new for entry in data.audit["skipped"] if entry["epoch"] == epoch]
        found = Counter((entry["key"], Path(entry["shard"]).name) for entry in reports)
        assert max(found.values()) == 1, f"epoch {epoch}: reported twice"
        assert {("twice", "shard-000004.tar"), (None, "shard-000002.tar")} <= set(found), f"epoch {epoch}"
    counts = consumed_per_epoch(old + new, range(until + 1))
    assert all(max(seen.values()) == 1 for seen in counts.values())
    assert len({frozenset(seen) for seen in counts.values()}) == 1, "each epoch reads the same readable keys"


def test_one_epoch_loaders_continue_the_epoch(dataset):
    folder, keys = dataset
    states, old = run_old(folder, 2, 1, steps=2, resampled=False)
    new = make(folder, 0, 1, 2, resampled=False)
    new.load_resharded(states)
    rest = [key for batch in new for key in batch["__key__"]]
    old_keys = [entry["key"] for data in old for entry in data.audit["delivered"]]
    assert sorted(old_keys + rest) == sorted(key for key in keys if key != POISONED)
    assert new.epoch == 1


def test_states_that_do_not_fit_are_refused(dataset, tmp_path_factory):
    folder, _ = dataset
    states, _ = run_old(folder, 2, 0, steps=1)
    with pytest.raises(ValueError, match=r"old ranks 0..W-1 in rank order, got ranks \[1\]"):
        make(folder, 0, 1, 0).load_resharded(states[1:])
    with pytest.raises(ValueError, match="resampled differs: saved True, now False"):
        make(folder, 0, 1, 0, resampled=False).load_resharded(states)
    other = tmp_path_factory.mktemp("other")
    write_shards([{"__key__": f"o{index}", "cls": "1", "txt": "t"} for index in range(8)], other, source="test",
                 args={}, shard_samples=2, progress=False)
    with pytest.raises(ValueError, match="shards differs"):
        make(other, 0, 1, 0).load_resharded(states)
