"""Image helpers for samples: tensors in [-1, 1] → uint8 arrays, PNG files and grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """(N, C, H, W) floats in ``value_range`` → (N, H, W, C) uint8."""
    low, high = value_range
    pixels = ((images.detach().float().cpu() - low) / (high - low)).clamp(0, 1)
    return (pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def to_pil(pixels: np.ndarray) -> Image.Image:
    """(H, W, C) uint8 with C = 1 or 3 → a grey or RGB PIL image."""
    return Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)


def image_grid(images: torch.Tensor, cols: int | None = None, padding: int = 2, upscale: int = 1) -> Image.Image:
    """Tile (N, C, H, W) images (C = 1 or 3, values in [-1, 1]) row by row, ``cols`` per row.

    ``cols`` defaults to ceil(sqrt(N)); tiles are separated by ``padding`` white pixels and the
    grid is enlarged ``upscale`` times (nearest neighbour) so small images stay legible.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"image_grid takes (N, C, H, W) images with C = 1 or 3, got shape {tuple(images.shape)}")
    pixels = to_uint8(images)
    count, height, width, channels = pixels.shape
    cols = cols or int(np.ceil(np.sqrt(count)))
    rows = -(-count // cols)
    grid = np.full((rows * (height + padding) + padding, cols * (width + padding) + padding, channels), 255, np.uint8)
    for index in range(count):
        top = padding + (index // cols) * (height + padding)
        left = padding + (index % cols) * (width + padding)
        grid[top : top + height, left : left + width] = pixels[index]
    image = to_pil(grid)
    return image.resize((image.width * upscale, image.height * upscale), Image.NEAREST) if upscale > 1 else image


def save_images(images: torch.Tensor, paths: list[Path]) -> None:
    """One PNG per (C, H, W) image of ``images``."""
    for pixels, path in zip(to_uint8(images), paths):
        to_pil(pixels).save(path)
