"""A small causal (left-to-right) transformer language model.

flowmill trains one per dataset as the reference model ("judge") that scores generated text
(generative perplexity, train/judge.py). GPT-2 style: token and learned position embeddings,
pre-LayerNorm blocks with causal self-attention, a final norm and an untied output projection.

Shapes: B batch, L sequence length, V vocabulary, D width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from flowmill.models.layers import FeedForward, attention


@dataclass
class CausalLMConfig:
    """Sizes of a causal LM; defaults are a ~3 M-parameter judge, small enough to train on a CPU."""

    vocab_size: int = 1024  # V, token ids are in [0, V)
    seq_len: int = 128  # L, longest sequence (learned positions are this long)
    dim: int = 256  # D, transformer width
    depth: int = 4  # number of blocks
    num_heads: int = 4  # attention heads per block (head width D / heads)
    mlp_ratio: float = 4.0  # feed-forward hidden width as a multiple of D
    dropout: float = 0.1  # dropout on residual branches and embeddings while training (small data overfits)

    def __post_init__(self) -> None:
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {self.vocab_size}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


class CausalBlock(nn.Module):
    """Pre-norm block: x + attn(LN(x)) with a causal mask, then x + mlp(LN(x)); (B, L, D) → (B, L, D)."""

    def __init__(self, config: CausalLMConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.norm1 = nn.LayerNorm(config.dim)
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        self.proj = nn.Linear(config.dim, config.dim)
        self.norm2 = nn.LayerNorm(config.dim)
        self.mlp = FeedForward(config.dim, int(config.dim * config.mlp_ratio))
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        qkv = self.qkv(self.norm1(x))  # (B, L, 3D)
        q, k, v = qkv.view(batch, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)  # each (B, H, L, Dh)
        x = x + self.dropout(self.proj(attention(q, k, v, mask)))
        return x + self.dropout(self.mlp(self.norm2(x)))


class CausalLM(nn.Module):
    """``forward(tokens)`` with tokens (B, L) long, L <= seq_len, returns next-token logits (B, L, V):
    position i predicts token i + 1 from tokens 0..i."""

    def __init__(self, config: CausalLMConfig):
        super().__init__()
        self.config = config
        self.token_embed = nn.Embedding(config.vocab_size, config.dim)
        self.pos_embed = nn.Parameter(torch.randn(1, config.seq_len, config.dim) * 0.02)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(CausalBlock(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        nn.init.normal_(self.token_embed.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        if length > self.config.seq_len:
            raise ValueError(f"sequence of {length} tokens is longer than seq_len {self.config.seq_len}")
        mask = torch.ones(length, length, dtype=torch.bool, device=tokens.device).tril()  # True: may attend
        h = self.dropout(self.token_embed(tokens) + self.pos_embed[:, :length])  # (B, L, D)
        for block in self.blocks:
            h = block(h, mask)
        return self.head(self.norm(h))
