"""Tests for flowmill.data.loader: splitting, exactly-once delivery, determinism, exact resume, bad data."""

import logging
import os
from collections import Counter

import pytest
import torch

from flowmill.data.loader import StreamingLoader, TooManyBadSamples
from flowmill.data.pack import write_shards
from flowmill.data.tario import ShardChecksumError


def decode_value(sample: dict) -> dict:
    """Decoder of the test shards: ``.cls`` → x (1,) float tensor, ``.txt`` kept as a str."""
    if b"bad" in sample["txt"]:
        raise ValueError("poisoned sample")
    return {"x": torch.tensor([float(sample["cls"])]), "txt": sample["txt"].decode()}


def make_shards(folder, shards: int, per_shard: int, poison: tuple[int, ...] = (), no_txt: tuple[int, ...] = (),
                count: int | None = None) -> list[str]:
    """Pack ``count`` (default shards × per_shard) samples keyed ``s0000``…, per_shard a shard; returns all keys."""
    samples = []
    for index in range(shards * per_shard if count is None else count):
        sample = {"__key__": f"s{index:04d}", "cls": str(index), "txt": "bad" if index in poison else f"text {index}"}
        if index in no_txt:
            del sample["txt"]
        samples.append(sample)
    write_shards(samples, folder, source="test", args={}, shard_samples=per_shard, progress=False)
    return [sample["__key__"] for sample in samples]


def loader(folder, **overrides) -> StreamingLoader:
    settings = dict(rank=0, world_size=1, batch_size=3, num_workers=0, seed=7, decode=decode_value, shuffle_buffer=8)
    settings.update(overrides)
    return StreamingLoader(folder, **settings)


def take(batches, count: int) -> list[dict]:
    return [next(batches) for _ in range(count)]


def epoch_accounts(folder, world_size: int, **settings) -> tuple[list[list[str]], list[dict], list[dict]]:
    """One non-resampled epoch read by every rank: (keys per rank, skipped reports, dropped reports)."""
    per_rank, skipped, dropped = [], [], []
    for rank in range(world_size):
        data = loader(folder, rank=rank, world_size=world_size, resampled=False, audit=True, **settings)
        per_rank.append([key for batch in data for key in batch["__key__"]])
        assert per_rank[-1] == [entry["key"] for entry in data.audit["delivered"]]
        skipped += data.audit["skipped"]
        dropped += data.audit["dropped"]
    return per_rank, skipped, dropped


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("num_workers", [0, 1, 2])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_key_is_delivered_once_or_reported(tmp_path, world_size, num_workers, drop_last):
    # 7 shards (6 of 5 samples, one of 3: 33 samples) divide evenly by no rank × worker count
    # and leave partial batches of 4; 3 samples are bad.
    keys = make_shards(tmp_path, shards=7, per_shard=5, poison=(2, 17), no_txt=(31,), count=33)
    per_rank, skipped, dropped = epoch_accounts(tmp_path, world_size, num_workers=num_workers,
                                                batch_size=4, drop_last=drop_last)
    delivered = [key for rank_keys in per_rank for key in rank_keys]
    accounted = Counter(delivered + [entry["key"] for entry in skipped] + [entry["key"] for entry in dropped])
    assert accounted == Counter(keys), "a key was duplicated or silently lost"
    assert sorted(entry["key"] for entry in skipped) == ["s0002", "s0017", "s0031"]
    assert all(entry["reason"] and entry["shard"].endswith(".tar") for entry in skipped)
    workers = max(1, num_workers)
    if drop_last:
        # The remainder policy drops at most batch_size - 1 samples per (rank, worker), and says why.
        assert len(dropped) <= world_size * workers * 3
        assert all("remainder" in entry["reason"] and "drop_last" in entry["reason"] for entry in dropped)
        assert all(len(rank_keys) % 4 == 0 for rank_keys in per_rank)
    else:
        assert dropped == []


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_get_disjoint_samples_covering_the_epoch(tmp_path, num_workers):
    keys = make_shards(tmp_path, shards=12, per_shard=4)
    per_rank = []
    for rank in range(3):
        data = loader(tmp_path, rank=rank, world_size=3, num_workers=num_workers, resampled=False)
        per_rank.append([key for batch in data for key in batch["__key__"]])
    delivered = [key for rank_keys in per_rank for key in rank_keys]
    assert sorted(delivered) == keys
    assert all(len(rank_keys) == 16 for rank_keys in per_rank)


def test_order_is_a_function_of_seed_and_epoch(tmp_path):
    make_shards(tmp_path, shards=4, per_shard=6)

    def epochs(seed):
        data = loader(tmp_path, seed=seed, resampled=False)
        return [[key for batch in data for key in batch["__key__"]] for _ in range(2)]

    first, again, other = epochs(1), epochs(1), epochs(2)
    assert first == again
    assert first != other
    assert first[0] != first[1] and sorted(first[0]) == sorted(first[1])


def test_batches_are_collated(tmp_path):
    make_shards(tmp_path, shards=2, per_shard=4)
    batch = next(iter(loader(tmp_path, batch_size=3)))
    assert batch["x"].shape == (3, 1) and batch["x"].dtype == torch.float32
    assert len(batch["txt"]) == 3 and len(batch["__key__"]) == 3
    assert [f"text {int(value)}" for value in batch["x"][:, 0]] == batch["txt"]


def batches_equal(left: list[dict], right: list[dict]) -> bool:
    return len(left) == len(right) and all(
        a["__key__"] == b["__key__"] and a["txt"] == b["txt"] and torch.equal(a["x"], b["x"]) for a, b in zip(left, right)
    )


@pytest.mark.parametrize("stop", [7, 20])
@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_resume_in_resampled_mode_is_exact(tmp_path, num_workers, stop):
    # 2 ranks, 8 shards of 5: each worker crosses epoch ends within 25 batches of 3; one sample is bad
    # and one shard truncated, so errors met while re-walking the stream must not be counted twice.
    make_shards(tmp_path, shards=8, per_shard=5, poison=(13,))
    truncated = tmp_path / "shard-000005.tar"
    os.truncate(truncated, truncated.stat().st_size // 2 + 100)
    settings = dict(rank=1, world_size=2, num_workers=num_workers, resampled=True, verify=False)
    total = 25
    full_loader = loader(tmp_path, **settings)
    full = take(iter(full_loader), total)
    first = loader(tmp_path, **settings)
    head = take(iter(first), stop)
    resumed = loader(tmp_path, **settings)
    resumed.load_state_dict(first.state_dict())
    tail = take(iter(resumed), total - stop)
    assert batches_equal(head + tail, full)
    assert resumed.stats == full_loader.stats
    assert sum(len(batch["__key__"]) for batch in full) == total * 3


@pytest.mark.parametrize("stop", [1, 4, 7])
def test_resume_mid_epoch_with_uneven_workers(tmp_path, stop):
    # 5 shards over 2 workers: one worker runs dry first, so the round-robin order changes mid-epoch.
    make_shards(tmp_path, shards=5, per_shard=4)
    settings = dict(num_workers=2, resampled=False, batch_size=2)
    full = [batch for batch in loader(tmp_path, **settings)]
    assert len(full) == 10
    first = loader(tmp_path, **settings)
    head = take(iter(first), stop)
    resumed = loader(tmp_path, **settings)
    resumed.load_state_dict(first.state_dict())
    assert batches_equal(head + list(resumed), full)
    assert resumed.epoch == 1


def test_state_from_other_settings_is_refused(tmp_path):
    make_shards(tmp_path, shards=4, per_shard=2)
    state = loader(tmp_path, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed: saved 1, now 2"):
        loader(tmp_path, seed=2).load_state_dict(state)


def test_bad_samples_are_skipped_counted_and_logged_once_per_shard(tmp_path, caplog):
    keys = make_shards(tmp_path, shards=3, per_shard=4, poison=(1, 2), no_txt=(9,))
    with caplog.at_level(logging.WARNING, logger="flowmill.data.loader"):
        data = loader(tmp_path, resampled=False)
        delivered = [key for batch in data for key in batch["__key__"]]
    assert sorted(delivered) == [key for key in keys if key not in ("s0001", "s0002", "s0009")]
    assert data.stats["skipped"] == 3
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2  # shard 0 has two bad samples, shard 2 one
    assert any("shard-000000.tar" in message and "poisoned sample" in message for message in messages)
    assert any("shard-000002.tar" in message and "s0009" in message and "KeyError" in message for message in messages)


def test_truncated_shard_is_reported_and_the_rest_delivered(tmp_path, caplog):
    make_shards(tmp_path, shards=3, per_shard=20)
    shard = tmp_path / "shard-000001.tar"
    os.truncate(shard, shard.stat().st_size // 2 + 100)
    with caplog.at_level(logging.WARNING, logger="flowmill.data.loader"):
        data = loader(tmp_path, resampled=False, num_workers=1, verify=False)
        delivered = [key for batch in data for key in batch["__key__"]]
    assert len(delivered) == len(set(delivered))
    assert set(f"s{index:04d}" for index in range(20)) <= set(delivered)
    assert 40 <= len(delivered) < 60
    assert data.stats["shard_errors"] >= 1
    assert any("shard-000001.tar" in record.getMessage() for record in caplog.records)


def test_unverified_truncated_shard_counts_the_samples_it_lost(tmp_path):
    make_shards(tmp_path, shards=3, per_shard=20)
    shard = tmp_path / "shard-000001.tar"
    os.truncate(shard, shard.stat().st_size // 2)
    data = loader(tmp_path, resampled=False, verify=False)
    delivered = sum(len(batch["__key__"]) for batch in data)
    assert data.stats["shard_errors"] == 1 and 40 < delivered < 60
    assert data.stats["skipped"] == 60 - delivered


def test_missing_source_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        loader(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        loader(tmp_path)
    with pytest.raises(FileNotFoundError, match="matches no files"):
        loader(str(tmp_path / "*.tar"))


def test_glob_and_brace_sources_read_the_same_shards(tmp_path):
    make_shards(tmp_path, shards=2, per_shard=3)
    by_manifest = loader(tmp_path / "manifest.json", resampled=False)
    by_glob = loader(str(tmp_path / "*.tar"), resampled=False)
    by_brace = loader(str(tmp_path / "shard-{000000..000001}.tar"), resampled=False)
    assert by_manifest.shards == by_glob.shards == by_brace.shards
    assert [batch["__key__"] for batch in by_glob] == [batch["__key__"] for batch in by_brace]


def test_too_few_shards_says_how_many_are_needed(tmp_path):
    make_shards(tmp_path, shards=3, per_shard=2)
    with pytest.raises(ValueError, match="needs at least 4"):
        loader(tmp_path, world_size=2, num_workers=2)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resampled_epochs_each_deliver_every_sample_once(tmp_path, num_workers):
    # 7 uneven shards over 2 ranks: ranks and workers hold different amounts, so their streams
    # cross epoch ends at different batches; still each epoch delivers every good sample once.
    keys = make_shards(tmp_path, shards=7, per_shard=5, poison=(4,), count=33)
    delivered = Counter()
    for rank in range(2):
        data = loader(tmp_path, rank=rank, world_size=2, num_workers=num_workers, batch_size=4, resampled=True, audit=True)
        batches = iter(data)
        while min(data.worker_epochs) < 3:
            next(batches)
        delivered.update((entry["key"], entry["epoch"]) for entry in data.audit["delivered"])
        assert {entry["key"] for entry in data.audit["skipped"]} <= {"s0004"}
    for epoch in range(3):
        seen = Counter({key: count for (key, seen_epoch), count in delivered.items() if seen_epoch == epoch})
        assert seen == Counter(key for key in keys if key != "s0004"), f"epoch {epoch}"


def test_set_epoch_reads_that_epoch(tmp_path):
    make_shards(tmp_path, shards=4, per_shard=3)
    sequential = loader(tmp_path, resampled=False)
    epochs = [[key for batch in sequential for key in batch["__key__"]] for _ in range(3)]
    jumped = loader(tmp_path, resampled=False)
    jumped.set_epoch(2)
    assert [key for batch in jumped for key in batch["__key__"]] == epochs[2]
    with pytest.raises(ValueError, match="non-resampled"):
        loader(tmp_path, resampled=True).set_epoch(1)


def test_too_many_bad_samples_stop_the_run(tmp_path):
    make_shards(tmp_path, shards=4, per_shard=10, poison=tuple(range(0, 40, 3)))  # 14 of 40 bad
    data = loader(tmp_path, resampled=True, max_skip_fraction=0.2, skip_check_after=20)
    with pytest.raises(TooManyBadSamples, match=r"were bad \(\d\d\.\d% > max_skip_fraction 20\.0%\).*poisoned sample"):
        for _ in data:
            pass
    assert 20 <= data.stats["skipped"] + data.stats["delivered"] < 40


def test_a_few_bad_samples_do_not_stop_the_run(tmp_path):
    # One bad sample first of all: 100% skipped after one read, but the check waits for skip_check_after samples.
    make_shards(tmp_path, shards=3, per_shard=10, poison=(0,))
    data = loader(tmp_path, resampled=False, shuffle_buffer=0, max_skip_fraction=0.01, skip_check_after=100)
    assert sum(len(batch["__key__"]) for batch in data) == 29
    assert data.stats["skipped"] == 1
    with pytest.raises(ValueError, match="max_skip_fraction"):
        loader(tmp_path, max_skip_fraction=1.5)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_shard_that_differs_from_its_manifest_is_an_error(tmp_path, num_workers):
    make_shards(tmp_path, shards=2, per_shard=4)
    shard = tmp_path / "shard-000001.tar"
    damaged = bytearray(shard.read_bytes())
    damaged[damaged.index(b"text 5")] ^= 1  # same size, one flipped bit in a caption
    shard.write_bytes(bytes(damaged))
    with pytest.raises(ShardChecksumError, match="shard-000001.tar does not match its manifest.*data.verify_shards=false"):
        list(loader(tmp_path, resampled=False, num_workers=num_workers))
    unverified = loader(tmp_path, resampled=False, num_workers=num_workers, verify=False)
    assert sum(len(batch["__key__"]) for batch in unverified) == 8


def test_truncated_shard_of_a_manifest_fails_its_checksum(tmp_path):
    make_shards(tmp_path, shards=2, per_shard=20)
    shard = tmp_path / "shard-000000.tar"
    os.truncate(shard, shard.stat().st_size // 2)
    with pytest.raises(ShardChecksumError, match="shard-000000.tar"):
        list(loader(tmp_path, resampled=False))


def test_shard_deleted_after_start_is_an_error(tmp_path):
    make_shards(tmp_path, shards=2, per_shard=4)
    data = loader(tmp_path, resampled=False)
    (tmp_path / "shard-000000.tar").unlink()
    with pytest.raises(FileNotFoundError, match="shard-000000.tar"):
        list(data)
