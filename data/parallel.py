"""Making pack samples on all cores, in an order that does not depend on the number of processes.

A pack source is a list of jobs (an input file, a range of clip indices, ...) and a
function ``make(job) -> list[sample]``. ``parallel_samples`` runs ``make`` over the jobs in
a process pool and yields the samples job by job in job order, so the shards written
from them are byte-identical whatever ``processes`` is. A job whose input cannot be used
raises ``BadInput``: it is reported as one line and packing goes on with the rest.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any


class BadInput(Exception):
    """An input that cannot be packed (unreadable, empty, too short); the message says why."""


class _Job:
    """Picklable ``job -> samples or the BadInput reason`` for pool workers."""

    def __init__(self, make: Callable[[Any], list[dict]]):
        self.make = make

    def __call__(self, job: Any) -> list[dict] | str:
        try:
            return self.make(job)
        except BadInput as exn:
            return str(exn)


def parallel_map(function: Callable[[Any], Any], jobs: Sequence[Any], processes: int) -> Iterator[Any]:
    """``function(job)`` for every job, in job order, computed by ``processes`` forked processes
    (``processes=1``: in this process)."""
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    if processes == 1 or len(jobs) <= 1:
        yield from map(function, jobs)
        return
    # Small chunks keep every process busy when jobs differ in cost (long and short videos).
    chunk = max(1, len(jobs) // (processes * 8))
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        yield from pool.imap(function, jobs, chunksize=chunk)


def warn(line: str) -> None:
    """Print one line about a rejected input to stderr."""
    print(line, file=sys.stderr, flush=True)


def parallel_samples(
    make: Callable[[Any], list[dict]],
    jobs: Sequence[Any],
    *,
    processes: int,
    rejected: list[dict],
    describe: Callable[[Any], str] = str,
    on_reject: Callable[[str], None] = warn,
) -> Iterator[dict]:
    """Samples of ``make(job)`` for every job, in job order, computed by ``processes`` processes.

    A job raising ``BadInput`` adds ``{"input": describe(job), "reason"}`` to ``rejected`` and
    calls ``on_reject`` with one line; any other exception stops packing. ``processes=1``
    runs in this process. Workers are forked, so ``make`` may use data loaded before the call.
    """

    for job, result in zip(jobs, parallel_map(_Job(make), jobs, processes)):
        if isinstance(result, str):
            rejected.append({"input": describe(job), "reason": result})
            on_reject(f"skipping {describe(job)}: {result}")
        else:
            yield from result
