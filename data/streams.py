"""Which raw samples each (rank, worker) reads in each epoch, in which order, and re-sharding.

- Each epoch, the shard list is shuffled with a RNG seeded by ``(seed, epoch)`` and cut into
  ``shards[rank::world_size][worker::workers]``, so in one epoch every shard goes to exactly
  one (rank, worker). The worker reads its shards in that order (``flowmill.data.tario``)
  through a shuffle buffer seeded by ``(seed, epoch, rank, worker)``: its stream of raw
  samples is a fixed function of those numbers, and a ``Position`` (epoch, samples pulled
  from the stream in that epoch) says how much of it was consumed.

- Re-sharding (``reshard``): a run saved by W_old ranks continues on W_new ranks. The new
  ranks continue in the *first unfinished epoch*, the smallest epoch any old worker had not
  finished. In that epoch and the next ones some old worker had already started, each new
  worker reads its shards of the new split, leaving out every sample the old ranks consumed
  (delivered, or pulled and skipped as bad): a shard an old worker had finished is not read
  at all; the samples an old worker had pulled from a shard it was reading are found by
  replaying that worker's stream up to its saved position (raw reading, no decoding). So
  each sample of those epochs is consumed exactly once across the old and the new ranks;
  later epochs are read normally. Errors the old ranks already reported are not reported
  again. The resharded epochs are described by the old ranks' positions (``Resharded``),
  which a loader keeps in its state until it has left them, so a resharded run saved again
  resumes exactly; a second re-sharding inside those epochs nests the descriptions.

Sample keys must be unique within a shard (webdataset's convention; ``flowmill data pack``
writes them so): what the old ranks consumed is remembered by (shard, key).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import webdataset as wds

from flowmill.data.remote import Storage
from flowmill.data.shards import Shard
from flowmill.data.tario import read_samples


@dataclass
class Position:
    """Where one worker's stream stands after the last item the main process handed out."""

    epoch: int  # epoch of the worker's stream
    offset: int  # raw samples (after the shuffle buffer) pulled from that epoch, decoded or not
    done: bool = False  # the worker finished its epoch (non-resampled mode only)


@dataclass
class Exclusion:
    """What one worker leaves out of its shards in a resharded epoch: what old ranks consumed."""

    shards: set[str] = field(default_factory=set)  # URLs of shards an old worker finished: not read
    keys: dict[str, set[str]] = field(default_factory=dict)  # shard URL → keys old workers pulled from it
    reported: set[str] = field(default_factory=set)  # URLs of shards whose read error old workers reported

    def merge(self, other: Exclusion, urls: set[str]) -> None:
        """Add what ``other`` excludes from the shards ``urls``."""
        self.shards |= other.shards & urls
        self.reported |= other.reported & urls
        for url in other.keys.keys() & urls:
            self.keys.setdefault(url, set()).update(other.keys[url])

    def read(self, shard: Shard, reports: list[dict], verify: bool, storage: Storage) -> Iterator[dict]:
        """Raw samples of ``shard`` not consumed before; reports of consumed samples and of
        read errors already reported are withheld."""
        if shard.url in self.shards:
            return
        consumed = self.keys.get(shard.url, set())
        reported = shard.url in self.reported
        local: list[dict] = []

        def forward() -> None:
            reports.extend(
                report for report in local
                if (report["key"] is None and not reported) or (report["key"] is not None and report["key"] not in consumed)
            )
            local.clear()

        for raw in read_samples(shard, local, verify=verify, storage=storage):
            forward()
            if raw["__key__"] not in consumed:
                yield raw
        forward()


@dataclass
class StreamPlan:
    """The raw sample streams of one rank: its workers' shards and shuffles per epoch. Picklable."""

    shards: list[Shard]  # all shards of the dataset, in source order
    rank: int
    world_size: int
    workers: int  # logical workers of the rank, max(1, num_workers)
    seed: int
    shuffle_buffer: int  # samples held for shuffling; 0 or 1 reads in file order
    verify: bool  # check each shard against its manifest sha256 on first read
    resharded: Resharded | None = None  # epochs continued from a run on another world size
    storage: Storage = field(default_factory=Storage)  # how remote shards are reached (options, retries)

    def shards_for(self, epoch: int, worker: int) -> list[Shard]:
        """This rank's and worker's shards in ``epoch``, in reading order."""
        order = list(self.shards)
        random.Random(f"shards-{self.seed}-{epoch}").shuffle(order)
        return order[self.rank :: self.world_size][worker :: self.workers]

    def exclusion_applies(self, epoch: int) -> bool:
        """Whether ``epoch`` is one this rank continues from a run on another world size."""
        return self.resharded is not None and self.resharded.covers(epoch)

    def exclusion(self, epoch: int, worker: int) -> Exclusion | None:
        """What ``worker`` leaves out in ``epoch`` (None outside the resharded epochs)."""
        if not self.exclusion_applies(epoch):
            return None
        return self.resharded.exclusion(epoch, {shard.url for shard in self.shards_for(epoch, worker)})

    def raw_samples(self, epoch: int, worker: int, reports: list[dict]) -> Iterator[dict]:
        """Undecoded samples of one worker in one epoch; problems met while reading are appended to ``reports``."""
        return self._stream(epoch, worker, reports, self.exclusion(epoch, worker))

    def _stream(self, epoch: int, worker: int, reports: list[dict], exclusion: Exclusion | None) -> Iterator[dict]:
        def read() -> Iterator[dict]:
            for shard in self.shards_for(epoch, worker):
                if exclusion is None:
                    yield from read_samples(shard, reports, verify=self.verify, storage=self.storage)
                else:
                    yield from exclusion.read(shard, reports, self.verify, self.storage)

        samples = read()
        if self.shuffle_buffer > 1:
            rng = random.Random(f"buffer-{self.seed}-{epoch}-{self.rank}-{worker}")
            samples = wds.shuffle(bufsize=self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
        return samples

    def consumed(self, epoch: int, worker: int, position: Position, urls: set[str]) -> Exclusion:
        """What ``worker`` had consumed of the shards ``urls`` in ``epoch`` when it stood at ``position``,
        including what it left out itself because earlier ranks had consumed it."""
        theirs = {shard.url for shard in self.shards_for(epoch, worker)} & urls
        result = Exclusion()
        if not theirs:
            return result
        if position.epoch + position.done > epoch:
            result.shards |= theirs
            return result
        inherited = self.exclusion(epoch, worker)
        if inherited is not None:
            result.merge(inherited, theirs)
        if position.epoch < epoch or position.offset == 0:
            return result
        reports: list[dict] = []
        pulled = 0
        for raw in self._stream(epoch, worker, reports, inherited):
            pulled += 1
            if raw["__url__"] in theirs:
                result.keys.setdefault(raw["__url__"], set()).add(raw["__key__"])
            if pulled == position.offset:
                break
        if pulled < position.offset:
            raise ValueError(
                f"saved loader position (epoch {epoch}, sample {position.offset}) of rank {self.rank} worker {worker} "
                f"is past the end of its {pulled} samples: the shards changed since the state was saved"
            )
        # Reports made up to that sample went out with the batches handed out before the state was saved.
        for report in reports:
            if report["shard"] not in theirs:
                continue
            if report["key"] is None:
                result.reported.add(report["shard"])
            else:
                result.keys.setdefault(report["shard"], set()).add(report["key"])
        return result


@dataclass
class Resharded:
    """The epochs a loader continues from a run on another world size, and how far that run got."""

    first_epoch: int  # the first epoch some old worker had not finished: the new ranks start there
    last_epoch: int  # the last epoch some old worker had started; later epochs are read normally
    sources: list[tuple[StreamPlan, list[Position]]]  # per old rank: its streams and its workers' positions
    description: dict  # what ``describe`` returns, kept for the loader's state

    def covers(self, epoch: int) -> bool:
        return self.first_epoch <= epoch <= self.last_epoch

    def exclusion(self, epoch: int, urls: set[str]) -> Exclusion:
        """Everything the old ranks consumed of the shards ``urls`` in ``epoch``."""
        result = Exclusion()
        for old, positions in self.sources:
            for worker, position in enumerate(positions):
                result.merge(old.consumed(epoch, worker, position, urls), urls)
        return result


def _old_plan(state: dict, shards: list[Shard], verify: bool, storage: Storage) -> tuple[StreamPlan, list[Position]]:
    config = state["config"]
    plan = StreamPlan(
        shards, config["rank"], config["world_size"], max(1, config["num_workers"]), config["seed"],
        config["shuffle_buffer"], verify, resharded_from(state.get("resharded"), shards, verify, storage), storage,
    )
    return plan, [Position(**position) for position in state["positions"]]


def resharded_from(description: dict | None, shards: list[Shard], verify: bool, storage: Storage) -> Resharded | None:
    """Rebuild the ``Resharded`` that ``description`` (from ``reshard``, kept in a loader state) describes."""
    if description is None:
        return None
    sources = [_old_plan(state, shards, verify, storage) for state in description["ranks"]]
    return Resharded(description["first_epoch"], description["last_epoch"], sources, description)


def reshard(states: list[dict], shards: list[Shard], verify: bool, storage: Storage) -> tuple[int, Resharded | None]:
    """From the loader states of every old rank (``states[r]`` of rank r): the epoch the new
    ranks start in and what they leave out (None when the old ranks stopped at epoch ends)."""
    positions = [Position(**position) for state in states for position in state["positions"]]
    first = min(position.epoch + position.done for position in positions)
    # The last epoch an old worker (or the run it was itself resharded from) had started.
    last = max(
        position.epoch if position.offset > 0 and not position.done else position.epoch + position.done - 1
        for position in positions
    )
    last = max([last] + [state["resharded"]["last_epoch"] for state in states if state.get("resharded")])
    if last < first:
        return first, None
    description = {
        "first_epoch": first,
        "last_epoch": last,
        "ranks": [
            {"config": state["config"], "positions": state["positions"], "resharded": state.get("resharded")}
            for state in states
        ],
    }
    return first, resharded_from(description, shards, verify, storage)
