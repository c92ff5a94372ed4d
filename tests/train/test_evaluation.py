"""flowmill.train.evaluation in one process: shares, passes, item streams, totals."""

from __future__ import annotations

import math

import pytest
import torch

from flowmill.train.distributed import DistEnv
from flowmill.train.evaluation import (
    Chunk,
    ItemStreams,
    Totals,
    alone,
    eval_chunks,
    gather_rows,
    item_generators,
    item_normal,
    share,
    take,
)
from flowmill.train.flm_objective import _normal

CPU = torch.device("cpu")


def env_of(rank: int, world: int) -> DistEnv:
    return DistEnv(rank=rank, local_rank=rank, world_size=world, device=CPU)


@pytest.mark.parametrize("count", [0, 1, 2, 5, 8, 13])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shares_cover_the_set_once_in_rank_order(count, world):
    blocks = [share(count, env_of(rank, world)) for rank in range(world)]
    assert [i for block in blocks for i in range(block.start, block.stop)] == list(range(count))
    assert blocks[0].stop - blocks[0].start == max(block.stop - block.start for block in blocks)


@pytest.mark.parametrize("count, size, world", [(13, 4, 2), (5, 2, 3), (1, 3, 2), (3, 1, 4), (8, 8, 2), (7, 64, 1)])
def test_chunks_are_each_ranks_share_in_passes(count, size, world):
    passes = [eval_chunks(count, size, env_of(rank, world)) for rank in range(world)]
    assert [i for chunks in passes for chunk in chunks for i in chunk.items] == list(range(count))
    assert all(1 <= len(chunk.items) <= size for chunks in passes for chunk in chunks)
    with pytest.raises(ValueError, match="at least one item"):
        eval_chunks(count, 0, env_of(0, world))


def test_chunk_rows_slice_a_batch():
    batch = {"img": torch.arange(10).view(5, 2), "txt": list("abcde"), "meta": 3}
    rows = take(batch, Chunk(range(1, 4)).rows)
    assert rows["img"].tolist() == [[2, 3], [4, 5], [6, 7]] and rows["txt"] == ["b", "c", "d"] and rows["meta"] == 3


def test_an_items_draws_do_not_depend_on_its_neighbours():
    whole = item_normal(item_generators(7, range(6)), (3, 2))
    assert whole.shape == (6, 3, 2)
    assert torch.equal(item_normal(item_generators(7, range(2, 5)), (3, 2)), whole[2:5])
    assert not torch.equal(whole[0], whole[1])
    assert not torch.equal(item_normal(item_generators(8, range(6)), (3, 2)), whole)
    assert item_normal([], (3, 2)).shape == (0, 3, 2)
    # The objectives' noise takes per-row streams the same way.
    assert torch.equal(_normal((6, 3, 2), item_generators(7, range(6)), CPU), whole)
    with pytest.raises(ValueError, match="2 generators for 3 rows"):
        _normal((3, 2), item_generators(7, range(2)), CPU)


def test_item_streams_continue_where_they_were_left():
    streams = ItemStreams(3)
    first = item_normal(streams.of(Chunk(range(0, 2))), (4,))
    second = item_normal(streams.of(Chunk(range(1, 3))), (4,))
    plain = [torch.randn(2, 4, generator=generator) for generator in item_generators(3, range(3))]
    assert torch.equal(first, torch.stack([plain[0][0], plain[1][0]]))
    assert torch.equal(second, torch.stack([plain[1][1], plain[2][0]]))  # item 1 continues its stream
    assert torch.equal(item_normal(streams.of(Chunk(range(0, 1))), (4,))[0], plain[0][1])


def test_totals_are_means_of_sums_and_counts():
    totals = Totals(["a", "never"])
    totals.add("a", torch.tensor(3.0), 2)
    totals.add("a", 5.0, 2)
    totals.add("b", 1.5, 1)
    means = totals.reduced()
    assert means["a"] == 2.0 and means["b"] == 1.5 and math.isnan(means["never"])
    assert totals.reduced(env_of(0, 1)) == pytest.approx(means, nan_ok=True)


def test_alone_and_a_job_of_one_keep_rows_as_they_are():
    env = env_of(1, 4)
    solo = alone(env)
    assert (solo.rank, solo.world_size, solo.local_rank, solo.device) == (0, 1, 1, CPU)
    assert share(10, solo) == slice(0, 10)
    rows = torch.arange(6).view(3, 2)
    assert torch.equal(gather_rows(rows, solo), rows)
