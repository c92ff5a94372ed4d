"""Quality metrics of generated token sequences: generative perplexity under a judge, unigram entropy.

Both follow the FLM paper's evaluation (github.com/david3684/flm, ``metrics.py``): the
generative perplexity is exp of the judge's mean next-token negative log-likelihood over
every token after the first; the entropy is the entropy of each sample's own token
frequencies, averaged over samples. A sampler that collapses into repeating a few tokens
gets a low perplexity and a low entropy, so the two are read together.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def unigram_entropies(tokens: torch.Tensor) -> torch.Tensor:
    """The entropy (nats, float64 (N,)) of each sample's token frequencies; tokens (N, L) integer.

    A sample of L distinct tokens scores log L, one token repeated scores 0.
    """
    if tokens.dim() != 2 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must be (N, L) with L >= 1, got shape {tuple(tokens.shape)}")
    entropies = []
    for sample in tokens:
        _, counts = torch.unique(sample, return_counts=True)
        entropies.append(torch.special.entr(counts.double() / counts.sum()).sum())
    return torch.stack(entropies) if entropies else torch.zeros(0, dtype=torch.float64)


def unigram_entropy(tokens: torch.Tensor) -> float:
    """Mean over samples of ``unigram_entropies``."""
    return unigram_entropies(tokens).mean().item()


@torch.no_grad()
def nll_total(judge: nn.Module, tokens: torch.Tensor, batch_size: int = 64) -> tuple[float, int]:
    """Summed next-token negative log-likelihood (nats) of tokens (N, L), L >= 2, under a causal LM,
    and the number of tokens scored (every token but the first of each sample).

    ``judge(tokens)`` must return next-token logits (N, L, V).
    """
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be (N, L) with L >= 2, got shape {tuple(tokens.shape)}")
    device = next(judge.parameters()).device
    was_training = judge.training
    judge.eval()
    total, count = 0.0, 0
    for chunk in tokens.split(batch_size):
        chunk = chunk.to(device)
        logits = judge(chunk[:, :-1]).float()  # (n, L - 1, V)
        nll = F.cross_entropy(logits.transpose(1, 2), chunk[:, 1:], reduction="none")
        total += nll.double().sum().item()
        count += chunk[:, 1:].numel()
    judge.train(was_training)
    return total, count


def mean_nll(judge: nn.Module, tokens: torch.Tensor, batch_size: int = 64) -> float:
    """Mean next-token negative log-likelihood (nats) of tokens (N, L), L >= 2 (see ``nll_total``)."""
    total, count = nll_total(judge, tokens, batch_size)
    return total / count


def generative_perplexity(judge: nn.Module, tokens: torch.Tensor, batch_size: int = 64) -> float:
    """exp(mean next-token NLL) of generated tokens (N, L) under the judge; lower reads as more fluent."""
    return math.exp(mean_nll(judge, tokens, batch_size))
