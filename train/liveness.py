"""Which rank stopped answering, when a collective times out.

A timed-out collective does not say who is missing, and after a gloo timeout the process
group itself is unusable. So every rank bumps a counter in the job's rendezvous store (the
TCP key-value store that ``init_distributed`` met the other ranks through) from a background
thread. A rank whose counter no longer moves is not answering: stopped, dead, or cut off.
"""

from __future__ import annotations

import datetime
import os
import threading
import time

import torch.distributed as dist

from flowmill.train.distributed import DistEnv

PREFIX = "flowmill/alive/"


def is_timeout(error: BaseException) -> bool:
    """Whether ``error`` is a collective that gave up waiting for another rank."""
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("timed out" in text or "timeout" in text)


class Heartbeat:
    """Beats for this rank every ``interval_s`` while the job runs; names the silent ranks on demand."""

    def __init__(self, env: DistEnv, interval_s: float):
        self.env = env
        self.interval_s = interval_s
        self.stopped = threading.Event()
        self.store = None
        self.thread = None
        if env.world_size > 1:
            self.store = self._connect()
            self.thread = threading.Thread(target=self._beat, name="flowmill-heartbeat", daemon=True)
            self.thread.start()

    def _connect(self) -> dist.TCPStore:
        # Its own client with a short timeout: a store call must not wait as long as the collectives do.
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=datetime.timedelta(seconds=max(5.0, 2 * self.interval_s)),
                             wait_for_workers=False)

    def _beat(self) -> None:
        key = f"{PREFIX}{self.env.rank}"
        while not self.stopped.wait(self.interval_s):
            try:
                self.store.add(key, 1)
            except RuntimeError:
                return  # the store is gone: the job is ending

    def silent_ranks(self) -> list[int] | None:
        """The ranks whose heartbeat did not move over a few intervals; None when the store does not answer."""
        if self.store is None:
            return []
        try:
            before = [self.store.add(f"{PREFIX}{rank}", 0) for rank in range(self.env.world_size)]
            time.sleep(3 * self.interval_s)
            after = [self.store.add(f"{PREFIX}{rank}", 0) for rank in range(self.env.world_size)]
        except RuntimeError:
            return None
        return [rank for rank, (old, new) in enumerate(zip(before, after)) if new == old and rank != self.env.rank]

    def stop(self) -> None:
        self.stopped.set()


def timeout_message(env: DistEnv, timeout_min: float, silent: list[int] | None) -> str:
    """The one line a rank prints when a collective timed out."""
    waited = f"rank {env.rank}: a collective waited parallel.timeout_min={timeout_min:g} min for the other ranks"
    if silent is None:
        return f"{waited}; the rendezvous store at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} " \
               "does not answer either (its host, rank 0 or the launcher, stopped)"
    if not silent:
        return f"{waited}; every rank is alive, so one is stuck elsewhere (an evaluation or save longer than the timeout?)"
    return f"{waited}; rank {', '.join(map(str, silent))} stopped answering"
