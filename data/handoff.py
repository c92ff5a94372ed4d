"""Handing collated batches from DataLoader workers to the main process through reused shared memory.

A tensor put on the DataLoader's queue as it is travels in a new shared-memory segment with
a file-descriptor handshake per tensor, and the segment's pages fault in afresh in both
processes: for batches of small samples that costs more than reading them from the tar
(docs/data.md, Performance). A reused block pays the handshake once and its pages stay mapped.

Instead each worker keeps a few shared-memory blocks and reuses them: it copies a batch's
tensors into a free block (``WorkerBlocks.pack``) and sends, besides the batch's other
fields, only where each tensor lies in the block; a block goes over the queue once, with
the first batch that uses it. The main process copies the tensors out into ordinary
memory and hands the block back at once (``MainBlocks.unpack``), so the batch it yields
owns its memory and nothing the training loop keeps can be overwritten.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from dataclasses import dataclass
from multiprocessing.connection import Connection

import torch

_ALIGN = 64  # bytes; every tensor in a block starts at a multiple, so any dtype can view it
_BLOCKS = 6  # at most this many blocks per worker: the DataLoader's prefetch (2 batches) and slack
_VIEWS = 256  # views of blocks the main process keeps


@dataclass(frozen=True)
class InBlock:
    """A batch tensor that travels in a worker's block: where it lies there."""

    offset: int  # bytes from the start of the block
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass
class Packed:
    """A batch as it crosses from a worker to the main process."""

    fields: dict  # the batch, its tensors replaced by ``InBlock``s when ``block`` is set
    block: int | None = None  # index of the worker's block holding the tensors; None: sent as they are
    new_block: torch.Tensor | None = None  # that block (uint8, shared memory), with the first batch using it


class WorkerBlocks:
    """A worker's side: the blocks it owns and which of them the main process has handed back."""

    def __init__(self, returned: Connection):
        self.returned = returned.fileno()  # block indices the main process has copied out of, 4 bytes each
        os.set_blocking(self.returned, False)
        self.blocks: list[torch.Tensor] = []
        self.free: list[int] = []

    def pack(self, batch: dict) -> Packed:
        """``batch`` with its tensors copied into a free block (a new one if none is large
        enough); sent as it is when the worker holds ``_BLOCKS`` blocks and none is free."""
        layout: dict[str, InBlock] = {}
        size = 0
        for name, value in batch.items():
            if isinstance(value, torch.Tensor) and value.numel() > 0 and not value.requires_grad:
                layout[name] = InBlock(size, value.dtype, tuple(value.shape))
                size += -(-value.numel() * value.element_size() // _ALIGN) * _ALIGN
        if not layout:
            return Packed(batch)
        index, new_block = self._take(size)
        if index is None:
            return Packed(batch)
        block = self.blocks[index]
        fields = dict(batch)
        for name, where in layout.items():
            _view(block, where).copy_(batch[name])
            fields[name] = where
        return Packed(fields, index, new_block)

    def _take(self, size: int) -> tuple[int | None, torch.Tensor | None]:
        """(index of a free block of at least ``size`` bytes, the block if the main process has
        not seen it yet); (None, None) when the worker holds ``_BLOCKS`` blocks and none is free."""
        self._collect_returned()
        fitting = [index for index in self.free if self.blocks[index].numel() >= size]
        if fitting:
            index = min(fitting, key=lambda index: self.blocks[index].numel())
            self.free.remove(index)
            return index, None
        if len(self.blocks) < _BLOCKS:
            index = len(self.blocks)
            self.blocks.append(torch.empty(0, dtype=torch.uint8))
        elif self.free:
            index = self.free.pop()  # too small: replaced by a larger one
        else:
            return None, None
        self.blocks[index] = torch.empty(size, dtype=torch.uint8).share_memory_()
        return index, self.blocks[index]

    def _collect_returned(self) -> None:
        while True:
            try:
                data = os.read(self.returned, 1 << 16)
            except BlockingIOError:
                return
            if not data:
                return
            # Each index was written in one 4-byte write, which a pipe never splits.
            self.free.extend(int.from_bytes(data[start : start + 4], "little") for start in range(0, len(data), 4))


class MainBlocks:
    """The main process's side for one pass over the workers: the blocks they sent and the
    pipes that hand the blocks back."""

    def __init__(self, workers: int):
        pipes = [multiprocessing.Pipe(duplex=False) for _ in range(workers)]
        self.returned = [reader for reader, _ in pipes]  # for the workers (inherited when they start)
        self.senders = [writer for _, writer in pipes]
        for sender in self.senders:
            # A worker that has stopped reading must not block the main process.
            os.set_blocking(sender.fileno(), False)
        self.blocks: dict[tuple[int, int], torch.Tensor] = {}
        self.views: dict[tuple[tuple[int, int], InBlock], torch.Tensor] = {}

    def unpack(self, worker: int, packed: Packed) -> dict:
        """The batch of ``packed`` (from logical ``worker``) in memory of its own; its block is handed back."""
        if packed.block is None:
            return packed.fields
        key = (worker, packed.block)
        if packed.new_block is not None:
            self.blocks[key] = packed.new_block
            self.views = {cached: view for cached, view in self.views.items() if cached[0] != key}
        batch = {
            name: self._view(key, value).clone() if isinstance(value, InBlock) else value
            for name, value in packed.fields.items()
        }
        try:
            os.write(self.senders[worker].fileno(), packed.block.to_bytes(4, "little"))
        except (BlockingIOError, BrokenPipeError):
            pass  # the worker is gone or not reading: once out of blocks it sends tensors as they are
        return batch

    def _view(self, key: tuple[int, int], where: InBlock) -> torch.Tensor:
        """The tensor ``where`` describes in block ``key``, viewing the block's memory. Cached:
        making a view costs more than copying a small tensor out of it."""
        view = self.views.get((key, where))
        if view is None:
            if len(self.views) >= _VIEWS:
                self.views.clear()  # batches of ever new shapes
            view = self.views[key, where] = _view(self.blocks[key], where)
        return view

    def close(self) -> None:
        for connection in self.returned + self.senders:
            connection.close()
        self.blocks.clear()
        self.views.clear()


def _view(block: torch.Tensor, where: InBlock) -> torch.Tensor:
    """The tensor ``where`` describes in ``block``, viewing the block's memory."""
    end = where.offset + math.prod(where.shape) * where.dtype.itemsize
    return block[where.offset : end].view(where.dtype).view(where.shape)
