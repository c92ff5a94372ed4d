"""Tests for flowmill.data.batches: one worker's stream of batches, the positions resume relies on, collating."""

import numpy as np
import pytest
import torch

from flowmill.data.batches import BatchPlan, collate, worker_stream
from flowmill.data.pack import write_shards
from flowmill.data.shards import dataset_shards
from flowmill.data.streams import Position, StreamPlan


def decode(sample: dict) -> dict:
    """``.cls`` → x (1,) float tensor; a ``.txt`` of "bad" raises; "wide" gives another shape."""
    text = sample["txt"].decode()
    if text == "bad":
        raise ValueError("poisoned sample")
    return {"x": torch.zeros(2) if text == "wide" else torch.tensor([float(sample["cls"])])}


def plan(folder, *, batch_size: int = 3, resampled: bool = False, drop_last: bool = False,
         texts: dict | None = None) -> BatchPlan:
    """A plan over 11 samples s00..s10 in one shard, read in file order by one worker; ``texts`` replaces captions."""
    samples = [{"__key__": f"s{index:02d}", "cls": str(index), "txt": (texts or {}).get(index, "ok")} for index in range(11)]
    write_shards(samples, folder, source="test", args={}, shard_samples=20, progress=False)
    stream = StreamPlan(dataset_shards(folder), rank=0, world_size=1, workers=1, seed=0, shuffle_buffer=0, verify=True)
    return BatchPlan(stream, resampled, batch_size, drop_last, decode)


def keys(envelopes) -> list[list[str]]:
    return [envelope.batch["__key__"] for envelope in envelopes if envelope.batch is not None]


def test_collate_stacks_arrays_numbers_and_lists():
    samples = [{"a": np.full((2, 3), index, np.float16), "t": torch.ones(4) * index, "n": index, "s": f"text {index}"}
               for index in range(3)]
    batch = collate(samples, ["k0", "k1", "k2"])
    assert batch["__key__"] == ["k0", "k1", "k2"]
    assert isinstance(batch["a"], torch.Tensor) and batch["a"].dtype == torch.float16 and batch["a"].shape == (3, 2, 3)
    assert batch["a"][:, 0, 0].tolist() == [0, 1, 2]
    assert batch["t"].shape == (3, 4) and batch["t"][2].tolist() == [2.0] * 4
    assert batch["n"].tolist() == [0, 1, 2] and batch["s"] == ["text 0", "text 1", "text 2"]


def test_every_batch_carries_the_raw_samples_pulled_before_it(tmp_path):
    envelopes = list(worker_stream(plan(tmp_path, texts={4: "bad"}), 0, Position(0, 0)))
    assert keys(envelopes) == [["s00", "s01", "s02"], ["s03", "s05", "s06"], ["s07", "s08", "s09"], ["s10"]]
    # The bad sample s04 was pulled, so it counts in the positions after it.
    assert [envelope.position for envelope in envelopes] == [
        Position(0, 3), Position(0, 7), Position(0, 10), Position(0, 11), Position(0, 11, done=True)
    ]
    assert [report["key"] for envelope in envelopes for report in envelope.skipped] == ["s04"]
    assert envelopes[1].skipped[0]["reason"] == "ValueError: poisoned sample" and envelopes[1].skipped[0]["epoch"] == 0


@pytest.mark.parametrize("stop", [1, 2, 3])
def test_a_stream_started_at_a_position_yields_the_batches_that_followed_it(tmp_path, stop):
    settings = plan(tmp_path, texts={4: "bad"}, resampled=True)
    whole = worker_stream(settings, 0, Position(0, 0))
    before = [next(whole) for _ in range(stop)]
    after = [next(whole) for _ in range(4)]
    resumed = worker_stream(settings, 0, before[-1].position)
    again = [next(resumed) for _ in range(4)]
    assert keys(again) == keys(after) and [envelope.position for envelope in again] == [e.position for e in after]
    # Reports too: a skip reported before the saved position (s04 of epoch 0 once stop > 1) is not reported again.
    reports = [[(report["key"], report["epoch"]) for report in envelope.skipped] for envelope in again]
    assert reports == [[(report["key"], report["epoch"]) for report in envelope.skipped] for envelope in after]
    assert ("s04", 0) in sum(reports, []) if stop == 1 else ("s04", 0) not in sum(reports, [])


def test_resampled_batches_run_across_the_epoch_end(tmp_path):
    envelopes = worker_stream(plan(tmp_path, batch_size=4, resampled=True), 0, Position(0, 0))
    first = [next(envelopes) for _ in range(3)]
    assert keys(first)[2][:3] == ["s08", "s09", "s10"] and len(keys(first)[2]) == 4
    assert first[2].epochs == [0, 0, 0, 1] and first[2].position == Position(1, 1)


def test_drop_last_drops_and_reports_the_remainder(tmp_path):
    envelopes = list(worker_stream(plan(tmp_path, batch_size=4, drop_last=True), 0, Position(0, 0)))
    assert keys(envelopes) == [["s00", "s01", "s02", "s03"], ["s04", "s05", "s06", "s07"]]
    assert [entry["key"] for entry in envelopes[-1].dropped] == ["s08", "s09", "s10"]
    assert "do not fill a batch of 4 (drop_last=True)" in envelopes[-1].dropped[0]["reason"]
    assert envelopes[-1].batch is None and envelopes[-1].position == Position(0, 11, done=True)


def test_a_sample_that_does_not_stack_with_the_batch_is_skipped(tmp_path):
    envelopes = list(worker_stream(plan(tmp_path, texts={1: "wide"}), 0, Position(0, 0)))
    assert keys(envelopes)[0] == ["s00", "s02", "s03"]
    assert envelopes[0].skipped[0]["key"] == "s01" and "x is (2,) torch.float32" in envelopes[0].skipped[0]["reason"]


def test_a_position_past_the_end_of_the_stream_is_refused(tmp_path):
    with pytest.raises(ValueError, match="past the end of its 11 samples: the shards changed"):
        list(worker_stream(plan(tmp_path), 0, Position(0, 12)))
