"""One worker's batches: its raw sample stream → decoded, collated batches, each with the position after it.

What the loader's exact resume relies on (``flowmill.data.loader`` keeps the positions):

- A worker's stream of raw samples in an epoch is a fixed function of ``(seed, epoch, rank,
  worker)`` (``flowmill.data.streams``). ``worker_stream`` decodes the samples and collates
  them into batches of ``batch_size``; every batch travels in an ``Envelope`` with the
  worker's ``Position`` after it: the epoch and the raw samples pulled from it, decoded or not.
- Started at a saved position, ``worker_stream`` re-walks the stream up to it without
  decoding, so it yields exactly the batches that followed that position; what went wrong
  before it was reported with the batches handed out before the state was saved, and is not
  reported again.
- Resampled mode: the worker runs epoch after epoch and a batch may hold the end of one
  epoch and the start of the next, so nothing is dropped. Otherwise the stream ends with its
  epoch: the last partial batch is yielded short (``drop_last=False``) or dropped with every
  key reported (``drop_last=True``), and a last envelope without a batch marks the worker done.
- A bad sample (the decoder raises, or its fields, shapes or dtypes differ from the batch's)
  is skipped and reported in the envelope with its key, shard and reason; the main process
  counts the reports.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from flowmill.data.handoff import Packed
from flowmill.data.streams import Position, StreamPlan

_ARRAYS = (torch.Tensor, np.ndarray)


@dataclass
class Envelope:
    """What a worker sends to the main process: a batch (or none) and its position after it."""

    worker: int  # logical worker id
    position: Position
    batch: dict | Packed | None  # collated batch (packed by a DataLoader worker), None for the end-of-epoch report
    epochs: list[int] = field(default_factory=list)  # epoch of each sample of the batch
    skipped: list[dict] = field(default_factory=list)  # {"key", "shard", "reason", "epoch"}; key None for shard-level errors
    dropped: list[dict] = field(default_factory=list)  # {"key", "reason", "epoch"}: remainder dropped by drop_last


@dataclass
class BatchPlan:
    """Everything a worker needs to produce its stream; picklable for DataLoader workers."""

    stream: StreamPlan  # which raw samples the rank's workers read, in which order
    resampled: bool  # run epoch after epoch, batches across epoch ends
    batch_size: int  # samples per batch
    drop_last: bool  # one-epoch mode: drop (and report) each worker's last partial batch
    decode: Callable[[dict], dict]  # raw sample → dict of tensors/values; raises to reject


def _mismatch(reference: dict, sample: dict) -> str | None:
    """Why ``sample`` cannot be stacked with ``reference`` (another decoded sample), or None."""
    if sample.keys() != reference.keys():
        return f"fields {sorted(sample)} differ from the batch's {sorted(reference)}"
    for name, value in sample.items():
        if isinstance(value, _ARRAYS):
            ref = reference[name]
            # torch.Size is a tuple: shapes of tensors and arrays compare as they are. Decoded
            # samples mostly share one dtype object, whose identity is cheaper to test than equality.
            if value.shape != ref.shape or (value.dtype is not ref.dtype and value.dtype != ref.dtype):
                return f"{name} is {tuple(value.shape)} {value.dtype}, the batch's is {tuple(ref.shape)} {ref.dtype}"
    return None


def collate(samples: list[dict], keys: list[str]) -> dict:
    """Stack decoded samples: tensors/arrays → (B, ...) tensors, numbers → (B,) tensors, others → lists.

    ``keys`` become the ``"__key__"`` list.
    """
    batch: dict = {"__key__": keys}
    for name, first in samples[0].items():
        values = [sample[name] for sample in samples]
        if isinstance(first, torch.Tensor):
            batch[name] = torch.stack(values)
        elif isinstance(first, np.ndarray):
            # One preallocated array filled in place: cheaper than np.stack, which first makes an
            # expanded view of every array, a per-sample cost of the loader (docs/data.md, Performance).
            stacked = np.empty((len(values), *first.shape), first.dtype)
            for index, value in enumerate(values):
                stacked[index] = value
            batch[name] = torch.from_numpy(stacked)
        elif isinstance(first, (bool, int, float)):
            batch[name] = torch.tensor(values)
        else:
            batch[name] = values
    return batch


def _decode_one(plan: BatchPlan, raw: dict) -> dict:
    decoded = plan.decode(raw)
    if not isinstance(decoded, dict):
        raise TypeError(f"decode must return a dict, returned {type(decoded).__name__}")
    return decoded


def _tag(reports: list[dict], epoch: int) -> None:
    """Give the shard reader's reports made while reading ``epoch`` their epoch."""
    for report in reports:
        report.setdefault("epoch", epoch)


def _take(reports: list[dict], epoch: int) -> list[dict]:
    """Empty ``reports`` in place (the shard reader keeps appending to it); returns what it held."""
    _tag(reports, epoch)
    taken = list(reports)
    reports.clear()
    return taken


def worker_stream(plan: BatchPlan, worker: int, start: Position) -> Iterator[Envelope]:
    """Envelopes of logical ``worker`` from position ``start`` on (endless in resampled mode)."""
    if start.done:
        return
    epoch, skip = start.epoch, start.offset
    samples: list[dict] = []
    keys: list[str] = []
    epochs: list[int] = []
    reports: list[dict] = []
    while True:
        pulled = 0
        decoded_this_epoch = 0
        for raw in plan.stream.raw_samples(epoch, worker, reports):
            pulled += 1
            if pulled <= skip:
                if pulled == skip:
                    # Reports up to here went out with batches before the state was saved.
                    reports.clear()
                continue
            try:
                decoded = _decode_one(plan, raw)
                reason = _mismatch(samples[0], decoded) if samples else None
            except Exception as exn:  # a bad sample must never stop training: any decoder error skips it
                reason = f"{type(exn).__name__}: {exn.args[0] if exn.args else exn}"
            if reason is not None:
                reports.append({"key": raw["__key__"], "shard": raw.get("__url__"), "reason": reason, "epoch": epoch})
                continue
            decoded_this_epoch += 1
            samples.append(decoded)
            keys.append(raw["__key__"])
            epochs.append(epoch)
            if len(samples) == plan.batch_size:
                yield Envelope(worker, Position(epoch, pulled), collate(samples, keys), epochs, _take(reports, epoch))
                samples, keys, epochs = [], [], []
        _tag(reports, epoch)
        if pulled < skip:
            raise ValueError(
                f"saved loader position (epoch {epoch}, sample {skip}) of worker {worker} is past the end of its "
                f"{pulled} samples: the shards changed since the state was saved"
            )
        # In a resharded epoch the old ranks may have consumed all of this worker's shards.
        resharded = plan.stream.exclusion_applies(epoch)
        if plan.resampled and decoded_this_epoch == 0 and skip == 0 and not resharded:
            raise RuntimeError(
                f"rank {plan.stream.rank} worker {worker} decoded no sample in epoch {epoch} ({pulled} read, shards "
                f"{[shard.url for shard in plan.stream.shards_for(epoch, worker)]}); refusing to loop on bad data"
            )
        if not plan.resampled:
            dropped: list[dict] = []
            if samples and not plan.drop_last:
                yield Envelope(worker, Position(epoch, pulled), collate(samples, keys), epochs, _take(reports, epoch))
            else:
                reason = (
                    f"remainder: the last {len(keys)} samples of rank {plan.stream.rank} worker {worker} in epoch {epoch} "
                    f"do not fill a batch of {plan.batch_size} (drop_last=True)"
                )
                dropped = [{"key": key, "reason": reason, "epoch": epoch} for key in keys]
            yield Envelope(worker, Position(epoch, pulled, done=True), None, [], _take(reports, epoch), dropped)
            return
        epoch, skip = epoch + 1, 0
