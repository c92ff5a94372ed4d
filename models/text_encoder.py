"""Text conditioning: a transformers text encoder built from config, frozen.

It returns what the MMDiT consumes: a sequence embedding ``txt`` (B, L, D) and a pooled
embedding ``vec`` (B, D) taken at each prompt's end-of-sequence token, as CLIP pools.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class TextEncoderConfig:
    kind: str = "clip"  # transformers architecture: clip (CLIPTextModel)
    tokenizer: str = "datasets/digits/tokenizer.model"  # sentencepiece model file
    dim: int = 64  # hidden width = txt and vec embedding size
    depth: int = 2  # transformer layers
    num_heads: int = 4  # attention heads
    max_length: int = 16  # tokens per prompt, end-of-sequence included; longer prompts are truncated
    seed: int = 0  # seeds the frozen random initialisation when no weights are given


TEXT_ENCODER_KINDS = ("clip",)


class TextEncoder(nn.Module):
    """Frozen transformers encoder over a tokenizer's ids; ``forward(input_ids, attention_mask) -> (txt, vec)``."""

    def __init__(self, cfg: TextEncoderConfig, vocab_size: int, pad_id: int, bos_id: int, eos_id: int):
        super().__init__()
        if cfg.kind not in TEXT_ENCODER_KINDS:
            raise ValueError(f"unknown text encoder kind {cfg.kind!r}; choose one of: {', '.join(TEXT_ENCODER_KINDS)}")
        from transformers import CLIPTextConfig, CLIPTextModel

        hf_config = CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=cfg.dim,
            intermediate_size=4 * cfg.dim,
            num_hidden_layers=cfg.depth,
            num_attention_heads=cfg.num_heads,
            max_position_embeddings=cfg.max_length,
            pad_token_id=pad_id,
            bos_token_id=bos_id,
            eos_token_id=eos_id,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.model = CLIPTextModel(hf_config)
        self.model.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) ids and mask → txt (B, L, D), vec (B, D)."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, D)
        # Pool at the last real token (the end-of-sequence), whatever the tokenizer's ids are.
        last = attention_mask.long().sum(dim=1).clamp(min=1) - 1  # (B,)
        vec = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return hidden, vec
