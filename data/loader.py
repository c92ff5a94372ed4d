"""The streaming loader training reads from: WebDataset shards → decoded, collated batches.

How a sample reaches a batch, and why resume is exact:

- Each worker's stream of raw samples in an epoch is a fixed function of
  ``(seed, epoch, rank, worker)`` (its shards of the epoch's split, through a seeded shuffle
  buffer: ``flowmill.data.streams``); the worker decodes and collates them into batches, each
  carrying the worker's position after it: epoch, raw samples pulled in that epoch
  (``flowmill.data.batches``).
- A DataLoader worker hands its batches to the main process through shared-memory blocks
  it reuses (``flowmill.data.handoff``); the main process copies each batch out of its block.
- The main process keeps the position of the last batch it handed out per worker and which
  worker comes next (``DataLoader`` hands out workers' outputs round-robin). Restoring that
  state, each worker re-walks its stream up to its position without decoding, and worker
  ids are rotated so the round-robin resumes with the right worker.
- On another world size, ``load_resharded`` takes the states of all old ranks: the new
  ranks continue the first unfinished epoch without the samples the old ranks consumed
  (see ``flowmill.data.streams``).

Resampled mode (``resampled=True``) is infinite: each worker runs epoch after epoch and
batches run across epoch ends, so nothing is ever dropped. Otherwise one pass of
``for batch in loader`` is one epoch, the next pass is the next epoch, and each worker's
last partial batch is yielded short (``drop_last=False``) or dropped and reported
(``drop_last=True``).

Bad samples (the decoder raises, a field is missing, a tar is truncated) are skipped,
counted in ``loader.stats`` and logged once per shard; the samples a truncated shard lost
count as skipped when its manifest gives its sample count. Once ``skip_check_after`` samples
have been read, a skipped fraction above ``max_skip_fraction`` raises
``TooManyBadSamples``. A shard that vanishes while reading, or whose bytes differ from the
sha256 in its manifest (``verify=True``), is an error, not a skip.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import asdict
from multiprocessing.connection import Connection
from pathlib import Path

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from flowmill.data.batches import BatchPlan, Envelope, worker_stream
from flowmill.data.handoff import MainBlocks, Packed, WorkerBlocks
from flowmill.data.remote import Storage
from flowmill.data.shards import dataset_shards
from flowmill.data.streams import Position, StreamPlan, reshard, resharded_from

__all__ = ["StreamingLoader", "TooManyBadSamples"]

log = logging.getLogger(__name__)

STATE_FORMAT = 1


class TooManyBadSamples(RuntimeError):
    """More than ``max_skip_fraction`` of the samples read so far were bad."""


class _WorkerStreams(IterableDataset):
    """The dataset each DataLoader worker iterates: its logical worker's stream."""

    def __init__(self, plan: BatchPlan, positions: list[Position], rotation: int, returned: list[Connection] | None):
        self.plan = plan
        self.positions = positions
        self.rotation = rotation  # DataLoader worker j serves logical worker (j + rotation) % workers
        self.returned = returned  # per logical worker, the pipe its shared-memory blocks come back on (workers only)

    def logical(self, physical: int) -> int:
        return (physical + self.rotation) % self.plan.stream.workers

    def __iter__(self) -> Iterator[Envelope]:
        info = get_worker_info()
        worker = self.logical(0 if info is None else info.id)
        if info is None:
            return worker_stream(self.plan, worker, self.positions[worker])
        # A DataLoader worker's heap is the forked parent's: frozen, garbage collections scan
        # only what the stream creates, not the parent's objects, and leave the pages shared
        # with the parent uncopied.
        gc.freeze()
        # A stop signal sent to the whole process group (a launcher stopping its job, Ctrl-C) is
        # the training process's to handle: it records the run's end, then closes its workers.
        # Ctrl-C is left to it. SIGTERM, which is also how multiprocessing ends daemonic workers
        # at interpreter exit, ends a worker at once but as a clean exit: a death by signal would
        # break that record with DataLoader's "worker killed by signal" error, and an ignored
        # SIGTERM would leave the training process waiting for its workers forever at exit.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, _exit_cleanly)
        return _packed(worker_stream(self.plan, worker, self.positions[worker]), WorkerBlocks(self.returned[worker]))


def _exit_cleanly(signum: int, frame) -> None:
    os._exit(0)


def _packed(envelopes: Iterator[Envelope], blocks: WorkerBlocks) -> Iterator[Envelope]:
    """``envelopes`` with their batches packed into the worker's shared-memory blocks (``flowmill.data.handoff``)."""
    for envelope in envelopes:
        if envelope.batch is not None:
            envelope.batch = blocks.pack(envelope.batch)
        yield envelope


def _identity(item):
    return item


def _digest(urls: list[str]) -> str:
    # Names, not full paths: a dataset moved to another folder still resumes.
    return hashlib.sha256("\n".join(Path(url).name for url in urls).encode()).hexdigest()[:16]


class StreamingLoader:
    """Batches of decoded samples from WebDataset shards for one rank; see the module docstring.

    Iterating yields dicts: the decoder's fields stacked to (B, ...) tensors (lists for
    strings) and ``"__key__"``: list of B sample keys.
    """

    def __init__(
        self,
        source: str | Path | list[str],
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        num_workers: int,
        seed: int,
        decode: Callable[[dict], dict],
        shuffle_buffer: int = 1000,
        resampled: bool = True,
        drop_last: bool = False,
        verify: bool = True,
        max_skip_fraction: float = 0.1,
        skip_check_after: int = 100,
        audit: bool = False,
        storage: Storage | None = None,
    ):
        """``source``: manifest, folder with manifest.json, brace pattern, glob or list of shard URLs.
        ``decode``: raw sample ``{"__key__", ext: bytes}`` → dict of tensors/values; raise to reject.
        ``shuffle_buffer``: samples held for shuffling (0 or 1: file order within the shard order).
        ``verify``: hash each shard on its first read and raise ``ShardChecksumError`` if it
        differs from its manifest's sha256 (sources without a manifest are not checked).
        ``max_skip_fraction``: raise ``TooManyBadSamples`` when more than this fraction of the
        samples read so far were skipped, checked once ``skip_check_after`` samples were read.
        ``audit``: keep every delivered key, skip and drop with its epoch in ``self.audit``
        (``flowmill data inspect``; memory grows with the samples read).
        ``storage``: how remote shards are reached, options and retries (``flowmill.data.remote``;
        default: the environment's credentials and endpoint, 3 retries).
        """
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0 samples, got {shuffle_buffer}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if not 0.0 <= max_skip_fraction <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction}")
        if skip_check_after < 1:
            raise ValueError(f"skip_check_after must be >= 1 sample, got {skip_check_after}")
        storage = storage or Storage()
        shards = dataset_shards(source, storage)
        workers = max(1, num_workers)
        if len(shards) < world_size * workers:
            raise ValueError(
                f"{source} has {len(shards)} shards but world_size={world_size} × num_workers={workers} needs at "
                f"least {world_size * workers} (each rank's worker reads whole shards); repack with smaller shards "
                "or use fewer workers"
            )
        self.source = source
        self.num_workers = num_workers
        self.max_skip_fraction = max_skip_fraction
        self.skip_check_after = skip_check_after
        self._plan = BatchPlan(
            StreamPlan(shards, rank, world_size, workers, seed, shuffle_buffer, verify, storage=storage),
            resampled, batch_size, drop_last, decode,
        )
        self._config = {
            "rank": rank, "world_size": world_size, "num_workers": num_workers, "batch_size": batch_size, "seed": seed,
            "shuffle_buffer": shuffle_buffer, "resampled": resampled, "drop_last": drop_last,
            "shards": _digest([shard.url for shard in shards]),
        }
        self.epoch = 0  # the next (or current) epoch of a non-resampled pass
        self._positions = [Position(0, 0) for _ in range(workers)]
        self._next_worker = 0
        self._stats = {"delivered": 0, "skipped": 0, "shard_errors": 0, "dropped": 0}
        self._logged_shards: set[str] = set()
        self._recent_reasons: list[str] = []
        # delivered: {"key", "epoch"}; skipped: {"key", "shard", "reason", "epoch"}; dropped: {"key", "reason", "epoch"}
        self.audit: dict[str, list[dict]] | None = {"delivered": [], "skipped": [], "dropped": []} if audit else None

    @property
    def shards(self) -> list[str]:
        """All shard URLs of the dataset, in source order."""
        return [shard.url for shard in self._plan.stream.shards]

    @property
    def stats(self) -> dict:
        """Counts since the start of training (restored by ``load_state_dict``): delivered samples,
        skipped bad samples (with those lost in unreadable shards whose manifest gives their
        count), shard-level read errors, samples dropped as remainder."""
        return dict(self._stats)

    @property
    def worker_epochs(self) -> list[int]:
        """Per logical worker, the epoch it is in (past the last one it finished)."""
        return [position.epoch + int(position.done) for position in self._positions]

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass of a non-resampled loader read ``epoch`` from its start."""
        if self._plan.resampled:
            raise ValueError("set_epoch applies to non-resampled loaders; a resampled loader runs epoch after epoch")
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = epoch
        self._positions = [Position(epoch, 0) for _ in self._positions]
        self._next_worker = 0

    def __iter__(self) -> Iterator[dict]:
        blocks = MainBlocks(self.num_workers) if self.num_workers > 0 else None
        streams = _WorkerStreams(
            self._plan, [Position(**asdict(p)) for p in self._positions], self._next_worker,
            None if blocks is None else blocks.returned,
        )
        if blocks is None:
            envelopes = iter(streams)
        else:
            envelopes = iter(DataLoader(streams, batch_size=None, num_workers=self.num_workers, collate_fn=_identity))
        try:
            for envelope in envelopes:
                if isinstance(envelope.batch, Packed):
                    envelope.batch = blocks.unpack(envelope.worker, envelope.batch)
                self._positions[envelope.worker] = envelope.position
                self._next_worker = (envelope.worker + 1) % self._plan.stream.workers
                self._account(envelope)
                if envelope.batch is not None:
                    yield envelope.batch
        finally:
            if blocks is not None:
                blocks.close()
        if not self._plan.resampled:
            self.epoch += 1
            self._positions = [Position(self.epoch, 0) for _ in self._positions]
            self._next_worker = 0

    def _account(self, envelope: Envelope) -> None:
        for report in envelope.skipped:
            if report["key"] is not None:
                self._stats["skipped"] += 1
            else:  # the unreadable rest of a shard: the samples it lost count as skipped when the manifest tells
                self._stats["shard_errors"] += 1
                self._stats["skipped"] += report.get("lost") or 0
            self._recent_reasons = (self._recent_reasons + [f"{report['key'] or report['shard']}: {report['reason']}"])[-3:]
            if report["shard"] not in self._logged_shards:
                self._logged_shards.add(report["shard"])
                what = f"sample {report['key']}" if report["key"] is not None else "the rest of the shard"
                log.warning(
                    "rank %d: skipping %s in shard %s: %s; further bad data in this shard is only counted",
                    self._plan.stream.rank, what, report["shard"], report["reason"],
                )
        self._stats["dropped"] += len(envelope.dropped)
        if envelope.batch is not None:
            self._stats["delivered"] += len(envelope.batch["__key__"])
        if self.audit is not None:
            if envelope.batch is not None:
                self.audit["delivered"].extend(
                    {"key": key, "epoch": epoch} for key, epoch in zip(envelope.batch["__key__"], envelope.epochs)
                )
            self.audit["skipped"].extend(envelope.skipped)
            self.audit["dropped"].extend(envelope.dropped)
        self._check_skip_fraction()

    def _check_skip_fraction(self) -> None:
        skipped = self._stats["skipped"]
        read = skipped + self._stats["delivered"] + self._stats["dropped"]
        if read >= self.skip_check_after and skipped > self.max_skip_fraction * read:
            raise TooManyBadSamples(
                f"rank {self._plan.stream.rank}: {skipped} of the {read} samples read so far from {self.source} were bad "
                f"({skipped / read:.1%} > max_skip_fraction {self.max_skip_fraction:.1%}); stopping instead of training "
                f"on what is left. Latest: {'; '.join(self._recent_reasons)}. Fix the data or raise max_skip_fraction."
            )

    def state_dict(self) -> dict:
        """Position after the last batch yielded: restoring it yields exactly the following batches."""
        resharded = self._plan.stream.resharded
        if resharded is not None and min(self.worker_epochs) > resharded.last_epoch:
            resharded = None  # every worker has left the resharded epochs: nothing is left out any more
        return {
            "format": STATE_FORMAT,
            "config": dict(self._config),
            "epoch": self.epoch,
            "positions": [asdict(position) for position in self._positions],
            "next_worker": self._next_worker,
            "stats": dict(self._stats),
            "resharded": None if resharded is None else resharded.description,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (from ``state_dict`` of a loader with the same settings and shards)."""
        _check_format(state)
        differing = {
            name: (state["config"].get(name), value) for name, value in self._config.items() if state["config"].get(name) != value
        }
        if differing:
            details = ", ".join(f"{name}: saved {saved!r}, now {now!r}" for name, (saved, now) in differing.items())
            raise ValueError(f"cannot resume the data loader exactly, settings differ ({details})")
        self.epoch = state["epoch"]
        self._positions = [Position(**position) for position in state["positions"]]
        self._next_worker = state["next_worker"]
        self._stats = dict(state["stats"])
        stream = self._plan.stream
        stream.resharded = resharded_from(state.get("resharded"), stream.shards, stream.verify, stream.storage)

    def load_resharded(self, states: list[dict], step: int = 0) -> None:
        """Continue a run saved on another world size: ``states[r]`` is the ``state_dict`` of old rank r.
        (``step``, the checkpoint's step, is not needed: the position is in the states.)

        This rank starts at the beginning of the first epoch some old worker had not finished
        and leaves out every sample the old ranks consumed in it and in the later epochs they
        had started, so across the old and the new ranks each sample of those epochs is
        consumed once (policy: ``flowmill.data.streams``). Batch size, workers, rank and world
        size may differ from the old run's; the shards and the mode (resampled or not) may not.
        Stats: the old ranks' counts are summed and shared out evenly over the new ranks, so
        the sum over the new ranks equals the old sum.
        """
        if not states:
            raise ValueError("load_resharded needs the loader states of every old rank, got none")
        for state in states:
            _check_format(state)
        world_sizes = sorted({state["config"]["world_size"] for state in states})
        ranks = [state["config"]["rank"] for state in states]
        if world_sizes != [len(states)] or ranks != list(range(len(states))):
            raise ValueError(
                f"load_resharded needs the states of old ranks 0..W-1 in rank order, got ranks {ranks} of world "
                f"sizes {world_sizes}"
            )
        for name in ("shards", "resampled"):
            saved = sorted({str(state["config"][name]) for state in states})
            if saved != [str(self._config[name])]:
                raise ValueError(
                    f"cannot continue the data stream on a new world size, {name} differs: saved {', '.join(saved)}, "
                    f"now {self._config[name]}"
                )
        stream = self._plan.stream
        self.epoch, stream.resharded = reshard(states, stream.shards, stream.verify, stream.storage)
        self._positions = [Position(self.epoch, 0) for _ in self._positions]
        self._next_worker = 0
        totals = {name: sum(state["stats"][name] for state in states) for name in self._stats}
        share = stream.world_size
        self._stats = {name: total // share + int(stream.rank < total % share) for name, total in totals.items()}


def _check_format(state: dict) -> None:
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"loader state format {state.get('format')!r} is not {STATE_FORMAT}")
