"""Masked-diffusion language model (MDLM), the absorbing-state discrete diffusion of Sahoo et al. 2024,
"Simple and Effective Masked Diffusion Language Models" (code: github.com/kuleshov-group/mdlm; the FLM
paper's baseline, github.com/david3684/flm ``algo.MDLM``).

Corruption replaces each token by the mask token ``mask_id = V`` (one id past the vocabulary)
with probability t: t = 0 is data, t = 1 is all masks, as flowmill's flows. The network reads
token ids (the mask included: its embedding table has V + 1 rows) and the time, and predicts
logits over the V real tokens only, so the mask has probability zero in every prediction (MDLM's
"zero masking" of the SUBS parameterisation; the carry-over of unmasked tokens is the objective's,
``flowmill.train.mdlm_objective``).

The backbone is the flow LM's (``flowmill.models.flow_lm``): the same config, DiT blocks, head and
sizes, with a token embedding in place of the one-hot projection and t itself (the share of masks)
as the time the adaLN conditioning embeds.

Shapes: B batch, L sequence length, V vocabulary, D width, C conditioning width.
"""

from __future__ import annotations

import torch
from torch import nn

from flowmill.models.flow_lm import FlowLMConfig, FlowLMHead, dit_block
from flowmill.models.layers import MLPEmbedder, timestep_embedding


def mask_id(config: FlowLMConfig) -> int:
    """The mask token's id: the first id past the vocabulary."""
    return config.vocab_size


class MaskedLMEmbed(nn.Module):
    """Token ids (B, L) in [0, V] and times (B,) → ``(h, cond)``, h (B, L, D), cond (B, C)."""

    def __init__(self, config: FlowLMConfig):
        super().__init__()
        self.seq_len = config.seq_len
        self.tokens = nn.Embedding(config.vocab_size + 1, config.dim)  # the last row is the mask's
        self.pos_embed = None if config.rotary else nn.Parameter(torch.randn(1, config.seq_len, config.dim) * 0.02)
        self.time_freq_dim = config.time_freq_dim
        self.time_embed = MLPEmbedder(config.time_freq_dim, config.cond_dim)

    def forward(self, tokens: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        length = tokens.shape[1]
        if length > self.seq_len:
            raise ValueError(f"sequence of {length} tokens is longer than seq_len {self.seq_len}")
        h = self.tokens(tokens)  # (B, L, D)
        if self.pos_embed is not None:
            h = h + self.pos_embed[:, :length]
        features = timestep_embedding(t, self.time_freq_dim)  # t in [0, 1] unscaled, as the flow LM's clock
        return h, self.time_embed(features.to(self.time_embed.linear_1.weight.dtype))


class MaskedDiffusionLM(nn.Module):
    """Bidirectional DiT over partly masked token sequences.

    ``forward(tokens_t, t)`` with tokens_t (B, L) long (``mask_id`` where masked) and t (B,) the
    masking time returns logits (B, L, V) of the clean tokens.
    """

    def __init__(self, config: FlowLMConfig):
        super().__init__()
        if config.flow_map or config.learned_loss_weight:
            raise ValueError("a masked-diffusion LM takes neither flow_map nor learned_loss_weight")
        self.config = config
        # Plain attributes the objective reads (a DeepSpeed engine's own ``config`` hides the model's).
        self.vocab_size = config.vocab_size
        self.seq_len = config.seq_len
        self.mask_id = mask_id(config)
        self.embed = MaskedLMEmbed(config)
        self.blocks = nn.ModuleList(dit_block(config) for _ in range(config.depth))
        self.head = FlowLMHead(config)

    def forward(self, tokens_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h, cond = self.embed(tokens_t, t)
        for block in self.blocks:
            h = block(h, cond)
        return self.head((h, cond))
