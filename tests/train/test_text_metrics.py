"""flowmill.train.text_metrics: unigram entropy and generative perplexity on hand-made cases."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flowmill.train.text_metrics import generative_perplexity, mean_nll, unigram_entropy


class FixedLM(nn.Module):
    """Next-token logits from a fixed table: row = current token (V, V); ignores the rest of the context."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table[tokens]


def test_unigram_entropy():
    assert unigram_entropy(torch.zeros(2, 10, dtype=torch.long)) == 0.0  # one token repeated
    assert unigram_entropy(torch.arange(8)[None]) == pytest.approx(math.log(8))  # all distinct
    mixed = torch.stack([torch.zeros(8, dtype=torch.long), torch.arange(8)])
    assert unigram_entropy(mixed) == pytest.approx(math.log(8) / 2)  # mean over samples, not pooled
    assert unigram_entropy(torch.tensor([[1, 1, 2, 2]])) == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="\\(N, L\\)"):
        unigram_entropy(torch.arange(4))


def test_generative_perplexity_uniform_and_perfect_judges():
    vocab = 6
    tokens = torch.randint(0, vocab, (5, 12), generator=torch.Generator().manual_seed(0))
    uniform = FixedLM(torch.zeros(vocab, vocab))
    assert generative_perplexity(uniform, tokens) == pytest.approx(vocab)
    counting = torch.arange(12)[None].repeat(3, 1) % vocab  # 0 1 2 ... 5 0 1 ...: next = current + 1
    perfect = FixedLM(50.0 * torch.eye(vocab).roll(1, dims=1))  # row i puts its mass on i + 1
    assert generative_perplexity(perfect, counting) == pytest.approx(1.0, abs=1e-6)
    assert generative_perplexity(perfect, counting, batch_size=1) == pytest.approx(1.0, abs=1e-6)
    # Only tokens after the first are scored: 2 of the 3 transitions here are right.
    half = torch.tensor([[0, 1, 2, 0]])
    assert mean_nll(perfect, half) == pytest.approx(50.0 / 3, rel=1e-3)
    with pytest.raises(ValueError, match="L >= 2"):
        mean_nll(uniform, torch.zeros(2, 1, dtype=torch.long))
