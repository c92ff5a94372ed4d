"""Video helpers for samples: clips in [-1, 1] → uint8 frames, side-by-side GIFs, MP4 files and
the quality-versus-token-count plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

GIF_FRAME_MS = 125  # 8 frames per second, the rate moving digits are packed at


def clip_uint8(video: torch.Tensor) -> np.ndarray:
    """One (T, C, H, W) clip in [-1, 1] → uint8 (T, H, W, 3) frames (a grey clip is repeated to RGB)."""
    pixels = ((video.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    frames = pixels.permute(0, 2, 3, 1).numpy()
    return np.repeat(frames, 3, axis=-1) if frames.shape[-1] == 1 else frames


def side_by_side_gif(columns: list[torch.Tensor], path: Path, padding: int = 2, upscale: int = 3) -> Path:
    """Write an animated GIF: one row per clip, one column per entry of ``columns`` (each (B, T, C, H, W),
    e.g. the input then its reconstructions), separated by ``padding`` white pixels, enlarged ``upscale`` times."""
    batch, frames, _, height, width = columns[0].shape
    rows = [[clip_uint8(column[b]) for column in columns] for b in range(batch)]
    canvas_h = batch * (height + padding) + padding
    canvas_w = len(columns) * (width + padding) + padding
    images = []
    for t in range(frames):
        canvas = np.full((canvas_h, canvas_w, 3), 255, np.uint8)
        for r, row in enumerate(rows):
            for c, clip in enumerate(row):
                top, left = padding + r * (height + padding), padding + c * (width + padding)
                canvas[top : top + height, left : left + width] = clip[t]
        image = Image.fromarray(canvas)
        images.append(image.resize((canvas_w * upscale, canvas_h * upscale), Image.NEAREST))
    images[0].save(path, save_all=True, append_images=images[1:], duration=GIF_FRAME_MS, loop=0)
    return path


def prompt_grid_gif(clips: torch.Tensor, num_prompts: int, path: Path) -> Path:
    """An animated GIF of (P·N, T, C, H, W) clips in prompt-major order: one row per prompt, N per row."""
    by_prompt = clips.reshape(num_prompts, -1, *clips.shape[1:])
    return side_by_side_gif([by_prompt[:, i] for i in range(by_prompt.shape[1])], path)


def quality_plot(num_tokens: list[int], curves: dict[str, list[float]], ylabel: str, path: Path,
                 baselines: dict[str, list[float]] | None = None) -> Path:
    """A PNG line plot of quality against the token count k (log2 axis), one line per curve;
    ``baselines`` are drawn dashed."""
    import matplotlib  # deliberately lazy (start-up time): only evaluations that plot need matplotlib

    matplotlib.use("Agg")  # files only: no display on training nodes
    from matplotlib import pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.5), dpi=100)
    for label, values in curves.items():
        axis.plot(num_tokens, values, marker="o", label=label)
    for label, values in (baselines or {}).items():
        axis.plot(num_tokens, values, linestyle="--", marker=".", label=label)
    axis.set_xscale("log", base=2)
    axis.set_xticks(num_tokens, [str(k) for k in num_tokens])
    axis.set_xlabel("tokens k (first k of the coarse-to-fine sequence)")
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
