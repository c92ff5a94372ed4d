"""Training progress on rank 0: a live bar on a terminal, plain lines in a log file.

SLURM and nohup send stderr to files, where a progress bar's carriage returns pile up into
one unreadable line; there each ``every`` steps gets one line of its own instead.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

from tqdm import tqdm

log = logging.getLogger("flowmill")


def duration(seconds: float) -> str:
    """``3725.0`` → ``1h02m05s``; ``65`` → ``1m05s``; ``4.2`` → ``4s``."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{seconds:02d}s"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class Progress:
    """Reports each finished step; ``enabled`` only on rank 0."""

    def __init__(self, step: int, max_steps: int, every: int, enabled: bool, stream: TextIO = sys.stderr):
        self.first_step = step
        self.max_steps = max_steps
        self.every = every
        self.enabled = enabled
        self.started = time.perf_counter()
        self.bar = tqdm(total=max_steps, initial=step, desc="train", unit="step", dynamic_ncols=True, file=stream) \
            if enabled and stream.isatty() else None

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", lr=f"{metrics['train/lr']:.2e}", refresh=False)
            self.bar.update(1)
        elif step % self.every == 0 or step == self.max_steps:
            log.info(self.line(step, metrics))

    def line(self, step: int, metrics: dict[str, float]) -> str:
        """``step 20/600 loss 0.1234 lr 1.00e-03 grad_norm 0.56 samples/s 812 elapsed 1m02s eta 30m01s``."""
        elapsed = time.perf_counter() - self.started
        done = max(1, step - self.first_step)
        eta = elapsed / done * (self.max_steps - step)
        return (f"step {step}/{self.max_steps} loss {metrics['train/loss']:.4f} lr {metrics['train/lr']:.2e} "
                f"grad_norm {metrics['train/grad_norm']:.3g} samples/s {metrics['train/samples_per_s']:.0f} "
                f"elapsed {duration(elapsed)} eta {duration(eta)}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
