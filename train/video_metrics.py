"""Reconstruction quality of clips: PSNR, SSIM, and the token-free baselines a tokenizer must beat.

Clips are float tensors (B, T, C, H, W) in [-1, 1]; metrics are computed on [0, 1] pixels
(clamped), averaged over frames and then over clips.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity


def _pixels(video: torch.Tensor) -> torch.Tensor:
    return ((video.detach().float().cpu() + 1) / 2).clamp(0, 1)


def psnr_per_clip(reconstruction: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Each clip's PSNR in dB (B,) (peak 1 on [0, 1] pixels); 100 dB for an exact copy."""
    error = (_pixels(reconstruction) - _pixels(reference)).pow(2).flatten(1).mean(dim=1)
    return torch.where(error > 0, -10 * torch.log10(error.clamp_min(1e-10)), torch.tensor(100.0))


def psnr(reconstruction: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over clips of each clip's PSNR in dB (``psnr_per_clip``)."""
    return float(psnr_per_clip(reconstruction, reference).mean())


def ssim_per_clip(reconstruction: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Each clip's mean SSIM over its frames (B,) float64 (scikit-image defaults: uniform 7×7 window; data range 1)."""
    ours = _pixels(reconstruction).permute(0, 1, 3, 4, 2).numpy()  # (B, T, H, W, C)
    theirs = _pixels(reference).permute(0, 1, 3, 4, 2).numpy()
    scores = [
        [structural_similarity(ours[b, t], theirs[b, t], data_range=1.0, channel_axis=-1) for t in range(ours.shape[1])]
        for b in range(ours.shape[0])
    ]
    return torch.tensor(np.mean(scores, axis=1) if scores else [], dtype=torch.float64)


def ssim(reconstruction: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean SSIM over every frame of every clip (clips have equal frame counts: the mean of ``ssim_per_clip``)."""
    return float(ssim_per_clip(reconstruction, reference).mean())


def token_bits(num_tokens: int, codebook_size: int) -> float:
    """Bits held by ``num_tokens`` tokens of a codebook of ``codebook_size`` codes."""
    return num_tokens * math.log2(codebook_size)


@dataclass(frozen=True)
class GridCode:
    """A plain 3-D grid code: the clip averaged over a (t, h, w) grid of cells (channels averaged
    too), each cell rounded to one of ``levels`` values in [-1, 1]; decoded by trilinear upsampling."""

    grid: tuple[int, int, int]  # cells along time, height, width
    levels: int  # values per cell

    @property
    def bits(self) -> float:
        return math.prod(self.grid) * math.log2(self.levels)

    def __call__(self, video: torch.Tensor) -> torch.Tensor:
        """(B, T, C, H, W) clips → their reconstructions from this code."""
        batch, frames, channels, height, width = video.shape
        grey = video.float().mean(dim=2)[:, None]  # (B, 1, T, H, W)
        cells = F.adaptive_avg_pool3d(grey, self.grid)
        step = 2 / (self.levels - 1)
        cells = ((cells.clamp(-1, 1) + 1) / step).round() * step - 1
        decoded = F.interpolate(cells, size=(frames, height, width), mode="trilinear", align_corners=False)
        return decoded[:, 0, :, None].expand(batch, frames, channels, height, width)


def grid_codes(frames: int, size: int, max_bits: float) -> list[GridCode]:
    """Every grid code of at most ``max_bits`` whose cells divide the clip evenly (1 to 16 levels)."""
    def divisors(n: int) -> list[int]:
        return [d for d in range(1, n + 1) if n % d == 0]

    codes = []
    for grid in itertools.product(divisors(frames), divisors(size), divisors(size)):
        for levels in (2, 4, 8, 16):
            code = GridCode(grid, levels)
            if code.bits <= max_bits:
                codes.append(code)
    return codes


def best_grid_code(video: torch.Tensor, max_bits: float) -> tuple[GridCode, float]:
    """The grid code of at most ``max_bits`` with the highest PSNR on ``video`` (B, T, C, H, W), and that PSNR.

    Picking the best grid on the evaluation clips themselves favours the baseline; a tokenizer
    that beats it beats any grid code of its bit budget.
    """
    _, frames, _, height, width = video.shape
    if height != width:
        raise ValueError(f"grid codes take square frames, got {height}×{width}")
    candidates = grid_codes(frames, height, max_bits)
    if not candidates:
        raise ValueError(f"no grid code fits in {max_bits:.1f} bits")
    scored = [(psnr(code(video), video), code) for code in candidates]
    value, code = max(scored, key=lambda item: item[0])
    return code, value
