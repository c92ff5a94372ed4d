"""Stopping at a step boundary on request (SLURM's preemption or time-limit signal).

A signal can reach the ranks at different moments, and a ZeRO checkpoint needs every rank.
So the handler only records the request; at the end of each optimizer step the ranks
agree (an all-reduce of the flag) and, if any rank was asked, all save one checkpoint
together and leave the loop with the outcome ``preempted``.
"""

from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

log = logging.getLogger("flowmill")


class StopRequest:
    """A flag set from a signal handler (or by hand) and read at step boundaries."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def request(self, reason: str) -> None:
        self.reason = self.reason or reason

    def install(self, signals: tuple[signal.Signals, ...] = (signal.SIGUSR2,)) -> None:
        """Record a request when one of ``signals`` arrives (instead of dying)."""
        for sig in signals:
            signal.signal(sig, lambda signum, frame: self.request(signal.Signals(signum).name))

    def agreed(self) -> bool:
        """True on every rank when any rank was asked to stop (collective: call on all ranks)."""
        flag = torch.tensor([1 if self.reason else 0])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not self.reason:
            self.reason = "another rank was asked to stop"
        return bool(flag.item())
