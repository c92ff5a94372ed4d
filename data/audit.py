"""Which sample goes where: run the training loader once per simulated rank and account for every key.

``inspect_epoch`` builds the same ``StreamingLoader`` training builds (same shard split,
shuffles, decoding, batching), once for each rank of a simulated world, and returns the keys
each rank receives in one epoch in delivery order, plus every key that was not delivered
with its reason: skipped (bad sample, unreadable shard) or dropped (the remainder policy).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flowmill.data.decode import GenericDecoder
from flowmill.data.loader import StreamingLoader
from flowmill.data.remote import Storage


def _rank_audit(loader: StreamingLoader, epoch: int, resampled: bool) -> dict[str, list[dict]]:
    if resampled:
        # Training's own stream: read from the start until every worker is past ``epoch``.
        batches = iter(loader)
        while min(loader.worker_epochs) <= epoch:
            next(batches)
        batches.close()
    else:
        loader.set_epoch(epoch)
        for _ in loader:
            pass
    return {name: [entry for entry in entries if entry["epoch"] == epoch] for name, entries in loader.audit.items()}


def inspect_epoch(
    source: str | Path | list[str],
    *,
    world_size: int,
    num_workers: int,
    epoch: int = 0,
    seed: int = 0,
    batch_size: int = 1,
    shuffle_buffer: int = 256,
    drop_last: bool = False,
    resampled: bool = False,
    verify: bool = True,
    decode: Callable[[dict], dict] | None = None,
    storage: Storage | None = None,
) -> dict:
    """What each of ``world_size`` ranks reads in ``epoch``.

    Returns ``{"ranks": [{"rank": r, "keys": [...]}, ...], "skipped": [{"key", "shard",
    "reason"}, ...], "dropped": [{"key", "reason"}, ...]}``; a skipped entry with key None
    is a shard whose rest could not be read, with ``"lost"``: the samples it lost (None
    when no manifest gives the shard's count). ``resampled=True`` follows the infinite
    training stream from its start (batches run across epoch ends); otherwise one
    non-resampled pass of ``epoch`` is read. ``decode`` defaults to ``GenericDecoder``; ``storage``
    says how remote shards are reached (``flowmill.data.remote``).
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    result: dict = {"ranks": [], "skipped": [], "dropped": []}
    for rank in range(world_size):
        loader = StreamingLoader(
            source, rank=rank, world_size=world_size, batch_size=batch_size, num_workers=num_workers, seed=seed,
            decode=decode or GenericDecoder(), shuffle_buffer=shuffle_buffer, resampled=resampled, drop_last=drop_last,
            verify=verify, max_skip_fraction=1.0, audit=True, storage=storage,
        )
        audit = _rank_audit(loader, epoch, resampled)
        result["ranks"].append({"rank": rank, "keys": [entry["key"] for entry in audit["delivered"]]})
        result["skipped"].extend(
            {"key": e["key"], "shard": e["shard"], "reason": e["reason"], **({"lost": e.get("lost")} if e["key"] is None else {})}
            for e in audit["skipped"]
        )
        result["dropped"].extend({"key": e["key"], "reason": e["reason"]} for e in audit["dropped"])
    return result
