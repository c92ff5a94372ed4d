"""flowmill.models.causal_lm: shapes, causality (no position sees its future), length limit."""

from __future__ import annotations

import pytest
import torch

from flowmill.models.causal_lm import CausalLM, CausalLMConfig

CONFIG = CausalLMConfig(vocab_size=16, seq_len=8, dim=32, depth=2, num_heads=2, dropout=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: torch on one thread


def test_logits_shape_and_causality():
    torch.manual_seed(0)
    model = CausalLM(CONFIG).eval()
    tokens = torch.randint(0, 16, (3, 8))
    logits = model(tokens)
    assert logits.shape == (3, 8, 16)
    changed = tokens.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 16
    other = model(changed)
    assert torch.allclose(logits[:, :5], other[:, :5], atol=1e-6)  # positions before 5 never see token 5
    assert not torch.allclose(logits[:, 5:], other[:, 5:])
    assert model(tokens[:, :4]).shape == (3, 4, 16)


def test_refuses_sequences_longer_than_its_positions_and_bad_sizes():
    model = CausalLM(CONFIG)
    with pytest.raises(ValueError, match="longer than seq_len 8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="not divisible"):
        CausalLMConfig(dim=30, num_heads=4)


def test_learns_a_deterministic_sequence():
    """Next-token training on one repeated pattern drives the loss toward zero."""
    torch.manual_seed(0)
    model = CausalLM(CONFIG)
    tokens = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]]).repeat(8, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).transpose(1, 2), tokens[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1
