"""The toy language of the in-process language-model objective tests: two fixed token patterns."""

from __future__ import annotations

import pytest
import torch

from flowmill.models.flow_lm import FlowLMConfig

V, L, BATCH = 8, 8, 32
CONFIG = FlowLMConfig(vocab_size=V, seq_len=L, dim=32, depth=2, num_heads=2, cond_dim=32, time_freq_dim=32, dropout=0.0)
PATTERNS = torch.stack([torch.arange(L) % V, (3 * torch.arange(L) + 1) % V])  # (2, L), differ everywhere


@pytest.fixture(autouse=True, scope="module")
def one_thread_per_module():
    """The toy models train on one torch thread (steady timing), restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pattern_rate(tokens: torch.Tensor) -> float:
    """Share of sampled rows (N, L) that are exactly one of the patterns."""
    return (tokens[:, None, :] == PATTERNS[None]).all(-1).any(-1).float().mean().item()
