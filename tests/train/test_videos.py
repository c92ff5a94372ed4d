"""flowmill.train.videos: clips to uint8 frames and the side-by-side GIFs of samples
(quality_plot is drawn by the video tokenizer runs of tests/train/tasks/test_video_tokenizer.py)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageSequence

from flowmill.train.videos import GIF_FRAME_MS, clip_uint8, prompt_grid_gif, side_by_side_gif


def gif_frames(path) -> list[np.ndarray]:
    with Image.open(path) as gif:
        return [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(gif)]


def test_clip_uint8_maps_the_range_and_repeats_grey_to_rgb():
    grey = torch.tensor([-1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 4)  # (T, C, H, W)
    frames = clip_uint8(grey)
    assert frames.shape == (1, 1, 4, 3) and frames.dtype == np.uint8
    assert frames[0, 0, :, 0].tolist() == [0, 128, 255, 255] and (frames[..., 0] == frames[..., 2]).all()
    colour = torch.zeros(2, 3, 4, 5)
    colour[:, 1] = 1.0
    assert clip_uint8(colour).shape == (2, 4, 5, 3) and clip_uint8(colour)[0, 0, 0].tolist() == [128, 255, 128]


def flickering(batch: int, frames: int, value: float) -> torch.Tensor:
    """(B, T, 1, 4, 4) grey clips at ``value``, except every odd frame, mid-grey (GIFs merge equal frames)."""
    clips = torch.full((batch, frames, 1, 4, 4), value)
    clips[:, 1::2] = 0.0
    return clips


def test_side_by_side_gif_one_row_per_clip_one_column_per_entry(tmp_path):
    black, white = flickering(2, 3, -1.0), flickering(2, 3, 1.0)
    path = side_by_side_gif([black, white], tmp_path / "clips.gif", padding=2, upscale=1)
    frames = gif_frames(path)
    assert len(frames) == 3 and frames[0].shape == (2 * 6 + 2, 2 * 6 + 2, 3)
    assert (frames[0][2:6, 2:6] == 0).all() and (frames[0][8:12, 2:6] == 0).all()  # column 0: the black clips
    assert (frames[0][2:6, 8:12] == 255).all() and (frames[0][0] == 255).all()  # column 1 and the border: white
    with Image.open(path) as gif:
        assert gif.info["duration"] == GIF_FRAME_MS // 10 * 10  # GIF stores centiseconds
    assert Image.open(side_by_side_gif([black], tmp_path / "big.gif", padding=2, upscale=3)).size == (3 * 8, 3 * 14)


def test_prompt_grid_gif_puts_each_prompts_samples_on_its_row(tmp_path):
    # 2 prompts x 3 samples in prompt-major order; prompt 1's samples are white.
    clips = torch.cat([flickering(3, 2, -1.0), flickering(3, 2, 1.0)])
    frames = gif_frames(prompt_grid_gif(clips, num_prompts=2, path=tmp_path / "grid.gif"))
    assert len(frames) == 2 and frames[0].shape == (3 * (2 * 6 + 2), 3 * (3 * 6 + 2), 3)
    first_row, second_row = frames[0][3 * 2 : 3 * 6], frames[0][3 * 8 : 3 * 12]
    assert (first_row[:, 3 * 2 : 3 * 6] == 0).all() and (first_row[:, 3 * 14 : 3 * 18] == 0).all()
    assert (second_row[:, 3 * 2 : 3 * 6] == 255).all()
