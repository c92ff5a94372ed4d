"""Tests for flowmill.data.handoff: batches through reused shared-memory blocks."""

import torch

from flowmill.data import handoff
from flowmill.data.handoff import InBlock, MainBlocks, WorkerBlocks
from flowmill.data.loader import StreamingLoader
from flowmill.data.pack import write_shards


def batch(seed: int, rows: int = 4) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "__key__": [f"k{seed}-{row}" for row in range(rows)],
        "x": torch.randn(rows, 3, 5, generator=generator).to(torch.bfloat16),
        "cls": torch.arange(rows) + seed,
        "mask": torch.rand(rows, 7, generator=generator) > 0.5,
        "txt": [f"text {row}" for row in range(rows)],
        "empty": torch.zeros(rows, 0),
    }


def assert_same(left: dict, right: dict) -> None:
    assert left.keys() == right.keys()
    for name, value in left.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == right[name].dtype and torch.equal(value, right[name]), name
        else:
            assert value == right[name], name


def test_batches_cross_intact_and_blocks_are_reused():
    main = MainBlocks(1)
    worker = WorkerBlocks(main.returned[0])
    first = worker.pack(batch(0))
    assert first.new_block is not None and isinstance(first.fields["x"], InBlock)
    assert first.fields["txt"] == batch(0)["txt"] and first.fields["empty"].shape == (4, 0)  # not worth a block
    received = main.unpack(0, first)
    assert_same(received, batch(0))
    for seed in range(1, 5):  # the main process hands the block back: the worker reuses it, not sending it again
        packed = worker.pack(batch(seed))
        assert packed.block == first.block and packed.new_block is None
        assert_same(main.unpack(0, packed), batch(seed))
    assert_same(received, batch(0))  # a batch handed out owns its memory
    main.close()


def test_a_larger_batch_gets_a_larger_block():
    main = MainBlocks(1)
    worker = WorkerBlocks(main.returned[0])
    main.unpack(0, worker.pack(batch(0)))
    packed = worker.pack(batch(1, rows=40))
    assert packed.new_block is not None
    assert_same(main.unpack(0, packed), batch(1, rows=40))
    main.close()


def test_without_free_blocks_batches_are_sent_as_they_are():
    main = MainBlocks(1)
    worker = WorkerBlocks(main.returned[0])
    held = [worker.pack(batch(seed)) for seed in range(handoff._BLOCKS + 2)]  # none handed back yet
    assert [packed.block for packed in held] == list(range(handoff._BLOCKS)) + [None, None]
    for seed, packed in enumerate(held):
        assert_same(main.unpack(0, packed), batch(seed))
    assert worker.pack(batch(9)).block is not None  # handed back: blocks again
    main.close()


def decode(sample: dict) -> dict:
    value = float(sample["cls"])
    return {"x": torch.full((2, 3), value).to(torch.bfloat16), "y": torch.full((4,), value).numpy(), "cls": int(value)}


def test_batches_from_a_worker_equal_those_read_in_process(tmp_path):
    # One worker reads the same stream as no worker. All batches are kept, many more than a
    # worker has blocks: the blocks are reused while the batches handed out stay intact.
    write_shards(({"__key__": f"s{index:04d}", "cls": str(index)} for index in range(60)), tmp_path,
                 source="test", args={}, shard_samples=10, progress=False)

    def batches(num_workers: int) -> list[dict]:
        loader = StreamingLoader(tmp_path, rank=0, world_size=1, batch_size=4, num_workers=num_workers, seed=3,
                                 decode=decode, shuffle_buffer=8, resampled=True)
        stream = iter(loader)
        return [next(stream) for _ in range(3 * handoff._BLOCKS + 5)]

    in_process, from_worker = batches(0), batches(1)
    for left, right in zip(in_process, from_worker):
        assert_same(left, right)
