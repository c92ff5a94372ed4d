"""Sample images: grids keep one row per prompt and the pixel values."""

import numpy as np
import pytest
import torch

from flowmill.train.images import image_grid, save_images, to_uint8


def test_grid_rows_and_columns_with_padding():
    images = torch.cat([torch.full((5, 1, 8, 8), -1.0), torch.full((1, 1, 8, 8), 1.0)])
    grid = image_grid(images, cols=3, padding=2)
    assert grid.size == (3 * 10 + 2, 2 * 10 + 2)  # 6 images, 3 per row: 2 rows
    pixels = np.asarray(grid)
    assert pixels[2, 2] == 0  # first image is black
    assert pixels[0, 0] == 255  # padding is white
    assert pixels[12 + 1, 2 + 2 * 10 + 1] == 255  # sixth image: row 1, column 2, white


def test_default_columns_upscale_and_rgb():
    grid = image_grid(torch.zeros(5, 3, 4, 4), padding=0, upscale=3)
    assert grid.mode == "RGB" and grid.size == (3 * 4 * 3, 2 * 4 * 3)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        image_grid(torch.zeros(3, 8, 8))


def test_to_uint8_and_save(tmp_path):
    images = torch.tensor([-1.0, 0.0, 1.0]).view(1, 1, 1, 3)
    assert to_uint8(images).ravel().tolist() == [0, 128, 255]
    save_images(images, [tmp_path / "a.png"])
    from PIL import Image

    assert np.asarray(Image.open(tmp_path / "a.png")).ravel().tolist() == [0, 128, 255]
