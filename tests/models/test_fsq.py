import pytest
import torch

from flowmill.models.fsq import FSQ


def test_shapes_and_codebook_size():
    fsq = FSQ([8, 5, 5, 5])
    codes, indices = fsq(torch.randn(2, 7, 4))
    assert fsq.codebook_size == 1000
    assert codes.shape == (2, 7, 4) and codes.dtype == torch.float32
    assert indices.shape == (2, 7) and indices.dtype == torch.int64
    assert indices.min() >= 0 and indices.max() < 1000


@pytest.mark.parametrize("levels", [[3], [4], [8, 5, 5, 5], [2, 7, 6]])
def test_every_level_is_reached_and_codes_lie_on_the_grid(levels):
    fsq = FSQ(levels)
    # Wide inputs so each channel visits its whole range, even and odd level counts alike.
    codes, _ = fsq(torch.linspace(-6, 6, 4001)[:, None].expand(-1, len(levels)))
    assert codes.min() >= -1 and codes.max() <= 1
    for channel, level in enumerate(levels):
        grid = codes[:, channel] * (level // 2)
        assert torch.equal(grid, grid.round())
        assert grid.unique().numel() == level


def test_round_trip_over_the_whole_codebook():
    fsq = FSQ([8, 5, 3, 4])
    indices = torch.arange(fsq.codebook_size)
    codes = fsq.indices_to_codes(indices)
    assert codes.shape == (fsq.codebook_size, 4)
    assert torch.equal(fsq.codes_to_indices(codes), indices)
    assert codes.unique(dim=0).shape[0] == fsq.codebook_size


def test_forward_codes_and_indices_agree():
    fsq = FSQ([7, 5, 5, 4])
    codes, indices = fsq(torch.randn(64, 4) * 2)
    assert torch.equal(fsq.indices_to_codes(indices), codes)
    assert torch.equal(fsq.codes_to_indices(codes), indices)


def test_straight_through_gradient_is_the_gradient_of_the_unrounded_map():
    fsq = FSQ([8, 5, 5])
    z = torch.randn(16, 3, requires_grad=True)
    weights = torch.randn(16, 3)
    codes, _ = fsq(z)
    (codes * weights).sum().backward()
    assert z.grad is not None and z.grad.abs().min() > 0

    z_ref = z.detach().clone().requires_grad_(True)
    unrounded = fsq._bound(z_ref) / torch.tensor([4.0, 2.0, 2.0])
    (unrounded * weights).sum().backward()
    torch.testing.assert_close(z.grad, z_ref.grad)


def test_bfloat16_input_keeps_dtype_and_gives_the_float32_indices():
    fsq = FSQ([8, 8, 8, 5, 5, 5])
    z = torch.randn(32, 6).bfloat16()
    codes, indices = fsq(z)
    assert codes.dtype == torch.bfloat16
    assert torch.equal(indices, fsq(z.float())[1])


@pytest.mark.parametrize("levels", [[], [1, 5], [5, 0], [5.0, 3]])
def test_bad_levels_are_refused(levels):
    with pytest.raises(ValueError, match="levels"):
        FSQ(levels)


def test_latent_width_that_does_not_fit_the_levels_is_refused():
    fsq = FSQ([8, 5, 5])
    with pytest.raises(ValueError, match=r"levels \[8, 5, 5\] quantizes 3 channels.*has 4"):
        fsq(torch.randn(2, 4))
    with pytest.raises(ValueError, match="quantizes 3 channels"):
        fsq.codes_to_indices(torch.zeros(2, 2))


def test_bad_indices_are_refused():
    fsq = FSQ([4, 4])
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        fsq.indices_to_codes(torch.tensor([0, 16]))
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        fsq.indices_to_codes(torch.tensor([-1]))
    with pytest.raises(ValueError, match="integer"):
        fsq.indices_to_codes(torch.tensor([1.0]))
