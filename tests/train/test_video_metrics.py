"""flowmill.train.video_metrics: PSNR and SSIM of clips in [-1, 1], and the grid-code baselines."""

from __future__ import annotations

import math

import pytest
import torch

from flowmill.train.video_metrics import GridCode, best_grid_code, grid_codes, psnr, ssim, token_bits


def clips(seed: int = 0, shape=(2, 4, 3, 8, 8)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_psnr_is_per_clip_then_averaged_and_100_db_for_a_copy():
    video = clips()
    assert psnr(video, video) == 100.0
    # Pixels off by 0.1 on [0, 1] (0.2 on [-1, 1]): 20 dB; one clip exact and one off: their mean.
    flat = torch.zeros(2, 1, 1, 4, 4)
    assert psnr(flat + 0.2, flat) == pytest.approx(20.0, abs=1e-4)
    off = flat.clone()
    off[1] += 0.2
    assert psnr(off, flat) == pytest.approx((100.0 + 20.0) / 2, abs=1e-4)


def test_psnr_and_ssim_clamp_to_the_pixel_range():
    white, brighter = torch.ones(1, 2, 3, 8, 8), torch.full((1, 2, 3, 8, 8), 3.0)
    assert psnr(brighter, white) == 100.0 and ssim(brighter, white) == pytest.approx(1.0)


def test_ssim_is_one_for_a_copy_and_lower_for_noise():
    video = clips()
    assert ssim(video, video) == pytest.approx(1.0)
    assert ssim(clips(seed=1), video) < 0.2


def test_token_bits():
    assert token_bits(4, 125) == pytest.approx(4 * math.log2(125))
    assert token_bits(1, 2) == 1.0


def test_a_grid_code_keeps_a_constant_clip_and_counts_its_bits():
    code = GridCode((1, 2, 2), levels=5)
    assert code.bits == pytest.approx(4 * math.log2(5))
    video = torch.full((1, 4, 3, 8, 8), 0.5)  # on the 5-level grid (-1, -0.5, 0, 0.5, 1)
    assert torch.allclose(code(video), video)
    assert code(clips()).shape == (2, 4, 3, 8, 8)


def test_grid_codes_fit_the_budget_and_divide_the_clip():
    codes = grid_codes(frames=4, size=8, max_bits=16)
    assert codes and all(code.bits <= 16 for code in codes)
    assert all(4 % t == 0 and 8 % h == 0 and 8 % w == 0 for code in codes for t, h, w in [code.grid])
    assert GridCode((1, 1, 1), 2) in codes and GridCode((4, 8, 8), 2) not in codes


def test_the_best_grid_code_is_the_best_of_its_budget():
    video = clips(shape=(2, 2, 3, 4, 4))
    code, value = best_grid_code(video, max_bits=8)
    assert value == max(psnr(candidate(video), video) for candidate in grid_codes(2, 4, 8))
    assert value == psnr(code(video), video)
    with pytest.raises(ValueError, match="grid codes take square frames, got 8×6"):
        best_grid_code(clips(shape=(1, 2, 3, 8, 6)), max_bits=8)
    with pytest.raises(ValueError, match="no grid code fits in 0.5 bits"):
        best_grid_code(video, max_bits=0.5)
