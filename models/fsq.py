"""Finite scalar quantization (FSQ, Mentzer et al. 2023, arXiv:2309.15505).

Each of the ``d = len(levels)`` channels of a latent is squashed into a bounded range and
rounded to one of ``levels[i]`` values; the tuple of rounded values is one code, and the
codebook is the implicit grid of ``prod(levels)`` codes. No codebook is learned, so there is
no codebook collapse and no commitment loss; gradients pass through the rounding unchanged
(straight-through estimator).

Codes are normalised to [-1, 1]; an index is the mixed-radix number whose digits are the
per-channel level indices, channel 0 being the least significant digit.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class FSQ(nn.Module):
    """Quantize (..., d) latents onto a grid with ``levels[i]`` values in channel i.

    ``forward(z)`` returns ``(codes, indices)``: codes (..., d) in [-1, 1] with the dtype of
    ``z`` and straight-through gradients, indices (...,) int64 in [0, codebook_size).
    """

    def __init__(self, levels: list[int] | tuple[int, ...]):
        super().__init__()
        levels = list(levels)
        if not levels:
            raise ValueError("FSQ levels is empty; give one level count per channel, e.g. [8, 5, 5, 5]")
        bad = [level for level in levels if not isinstance(level, int) or isinstance(level, bool) or level < 2]
        if bad:
            raise ValueError(f"FSQ levels must be integers >= 2 (a channel with one level carries no information); got {levels}")
        self.levels = levels
        self.dim = len(levels)
        self.codebook_size = math.prod(levels)
        level_tensor = torch.tensor(levels, dtype=torch.int64)
        # Digit weights of the mixed-radix index: 1, L0, L0·L1, ...
        basis = torch.cumprod(torch.tensor([1] + levels[:-1], dtype=torch.int64), dim=0)
        self.register_buffer("_levels", level_tensor, persistent=False)
        self.register_buffer("_basis", basis, persistent=False)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, codebook_size={self.codebook_size}"

    def _check_dim(self, tensor: torch.Tensor, what: str) -> None:
        if tensor.shape[-1] != self.dim:
            raise ValueError(
                f"FSQ with levels {self.levels} quantizes {self.dim} channels, but the {what} has "
                f"{tensor.shape[-1]} in its last dimension (shape {tuple(tensor.shape)}); "
                f"give one level per channel or project the {what} to {self.dim} channels"
            )

    def _bound(self, z: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
        """Squash (..., d) float32 latents so rounding yields exactly ``levels[i]`` integers.

        Odd L rounds to {-(L-1)/2, ..., (L-1)/2}; even L has no centre value, so its range is
        shifted by half a step to {-L/2, ..., L/2 - 1}, with tanh(z) still 0 at z = 0.
        """
        levels = self._levels.to(z.dtype)
        half_range = (levels - 1) * (1 + eps) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0).to(z.dtype)
        shift = torch.atanh(offset / half_range)
        return torch.tanh(z + shift) * half_range - offset

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize (..., d) latents; returns codes (..., d) and indices (...,) int64."""
        self._check_dim(z, "latent")
        # Rounding boundaries are computed in float32: bf16 cannot resolve them for levels > 4.
        bounded = self._bound(z.float())
        rounded = bounded + (bounded.round() - bounded).detach()  # straight-through round
        codes = rounded / (self._levels // 2)
        return codes.to(z.dtype), self.codes_to_indices(codes.detach())

    def codes_to_indices(self, codes: torch.Tensor) -> torch.Tensor:
        """Map (..., d) codes in [-1, 1] to (...,) int64 indices in [0, codebook_size)."""
        self._check_dim(codes, "code")
        half_width = self._levels // 2
        digits = (codes.float() * half_width + half_width).round().long()  # (..., d) in [0, L_i)
        return (digits * self._basis).sum(dim=-1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Map (...,) integer indices to (..., d) float32 codes; inverse of ``codes_to_indices``."""
        if indices.dtype.is_floating_point or indices.dtype == torch.bool:
            raise ValueError(f"FSQ indices must be an integer tensor, got dtype {indices.dtype}")
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.codebook_size):
            raise ValueError(
                f"FSQ indices must lie in [0, {self.codebook_size}) for levels {self.levels}; "
                f"got values in [{int(indices.min())}, {int(indices.max())}]"
            )
        digits = (indices.long()[..., None] // self._basis) % self._levels  # (..., d)
        half_width = self._levels // 2
        return (digits - half_width).float() / half_width
