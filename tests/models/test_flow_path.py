"""Rectified-flow path (float64 math), timestep distributions, resolution shift."""

from __future__ import annotations

import math

import pytest
import torch

from flowmill.models.flow_path import FlowPath, build_timestep_sampler, shift_time


def batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn(4, 3, 5, 5, generator=generator, dtype=torch.float64)
    noise = torch.randn(4, 3, 5, 5, generator=generator, dtype=torch.float64)
    return x0, noise


def test_path_is_the_straight_line_from_data_at_0_to_noise_at_1():
    x0, noise = batch()
    t = torch.tensor([0.0, 0.25, 0.7, 1.0], dtype=torch.float64)
    sample = FlowPath().sample(x0, noise, t)
    expected = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * noise
    torch.testing.assert_close(sample.x_t, expected, rtol=0, atol=1e-15)
    assert torch.equal(sample.x_t[0], x0[0]) and torch.equal(sample.x_t[3], noise[3])
    assert torch.equal(sample.target, noise - x0)
    assert sample.x_t.dtype == torch.float64


def test_target_is_the_time_derivative_of_the_path():
    x0, noise = batch(1)
    path = FlowPath()
    t = torch.full((4,), 0.4, dtype=torch.float64)
    step = 1e-6
    derivative = (path.sample(x0, noise, t + step).x_t - path.sample(x0, noise, t - step).x_t) / (2 * step)
    torch.testing.assert_close(derivative, path.sample(x0, noise, t).target, rtol=0, atol=1e-8)


def test_path_refuses_mismatched_shapes():
    x0, noise = batch()
    with pytest.raises(ValueError, match="differ in shape"):
        FlowPath().sample(x0, noise[:, :2], torch.zeros(4))
    with pytest.raises(ValueError, match=r"t must be \(4,\)"):
        FlowPath().sample(x0, noise, torch.zeros(4, 1))


N = 200_000


def quantiles(t: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    return torch.quantile(t.double()[:100_000], levels)


def test_uniform_timesteps():
    t = build_timestep_sampler("uniform").sample(N, torch.Generator().manual_seed(0))
    assert t.shape == (N,) and t.min() >= 0 and t.max() < 1
    assert abs(t.double().mean() - 0.5) < 0.005 and abs(t.double().var() - 1 / 12) < 0.002


def test_logit_normal_quantiles_match_the_distribution():
    sampler = build_timestep_sampler("logit_normal", mean=-0.5, std=0.8)
    t = sampler.sample(N, torch.Generator().manual_seed(1))
    assert t.shape == (N,) and t.min() > 0 and t.max() < 1
    levels = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
    normal = torch.distributions.Normal(torch.tensor(-0.5, dtype=torch.float64), torch.tensor(0.8, dtype=torch.float64))
    expected = torch.sigmoid(normal.icdf(levels))
    torch.testing.assert_close(quantiles(t, levels), expected, rtol=0, atol=0.006)


def test_mode_quantiles_match_the_papers_map():
    scale = 1.29
    t = build_timestep_sampler("mode", scale=scale).sample(N, torch.Generator().manual_seed(2))
    assert t.min() >= 0 and t.max() <= 1
    levels = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
    # t = f(u) decreases in u, so the q-quantile of t is f(1 - q).
    u = 1 - levels
    expected = 1 - u - scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)
    torch.testing.assert_close(quantiles(t, levels), expected, rtol=0, atol=0.006)
    # Positive scales pull times to the middle: fewer samples near the ends than uniform.
    assert ((t < 0.1) | (t > 0.9)).double().mean() < 0.1


def test_mode_with_scale_zero_is_uniform():
    generator = torch.Generator().manual_seed(3)
    mode = build_timestep_sampler("mode", scale=0.0).sample(1000, generator)
    uniform = build_timestep_sampler("uniform").sample(1000, torch.Generator().manual_seed(3))
    torch.testing.assert_close(mode, 1 - uniform)


def test_samplers_are_reproducible_from_a_generator_and_land_on_the_device():
    for name in ("uniform", "logit_normal", "mode"):
        sampler = build_timestep_sampler(name)
        first = sampler.sample(16, torch.Generator().manual_seed(7))
        second = sampler.sample(16, torch.Generator().manual_seed(7), device="cpu")
        assert torch.equal(first, second) and first.device.type == "cpu"
        assert not torch.equal(first, sampler.sample(16, torch.Generator().manual_seed(8)))


def test_unknown_sampler_names_and_parameters_are_refused():
    with pytest.raises(ValueError, match="choose one of: logit_normal, uniform, mode"):
        build_timestep_sampler("lognorm")
    with pytest.raises(ValueError, match="mean"):
        build_timestep_sampler("logit_normal", mu=0.0)
    with pytest.raises(ValueError, match="no parameters"):
        build_timestep_sampler("uniform", scale=1.0)
    with pytest.raises(ValueError, match="mode scale must be in"):
        build_timestep_sampler("mode", scale=2.0)
    with pytest.raises(ValueError, match="std must be positive"):
        build_timestep_sampler("logit_normal", std=0.0)


def test_shift_time():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.equal(shift_time(t, 1.0), t)
    shifted = shift_time(t, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and (shifted.diff() > 0).all() and (shifted >= t).all()
    assert shifted[50] == 0.75  # 3·0.5 / (1 + 2·0.5)
    torch.testing.assert_close(shift_time(shifted, 1 / 3.0), t, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="must be positive"):
        shift_time(t, 0.0)


def test_bf16_path_is_mixed_at_float32_time():
    x0, noise = (tensor.bfloat16() for tensor in batch(2))
    t = torch.tensor([0.999, 0.3, 0.501, 0.0])
    sample = FlowPath().sample(x0, noise, t)
    expected = torch.lerp(x0.float(), noise.float(), t.view(-1, 1, 1, 1)).bfloat16()
    assert sample.x_t.dtype == torch.bfloat16 and torch.equal(sample.x_t, expected)
    rounded_time = torch.lerp(x0, noise, t.bfloat16().view(-1, 1, 1, 1))
    assert not torch.equal(sample.x_t, rounded_time)
