"""Helpers for the tests that import diffusers' SD3 transformers: a tiny one with every weight random."""

from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel

# The architecture of configs/mmdit_tiny.yaml, in diffusers' terms.
TINY_SD3 = dict(sample_size=32, patch_size=8, in_channels=1, out_channels=1, num_layers=2, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32,
                pos_embed_max_size=4, qk_norm="rms_norm")


def random_sd3(seed: int = 0, **overrides) -> SD3Transformer2DModel:
    """A diffusers SD3 transformer with every weight random (zero-initialised layers included)."""
    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**{**TINY_SD3, **overrides}).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model
