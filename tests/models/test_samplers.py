"""ODE solvers on velocity fields with known solutions, and classifier-free guidance."""

from __future__ import annotations

import math

import pytest
import torch

from flowmill.models.flow_path import FlowPath
from flowmill.models.mmdit import MMDiT, mmdit_config
from flowmill.models.samplers import build_sampler, cfg_velocity, guided, time_grid

torch.set_num_threads(1)


def noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class Counting:
    """A velocity function that counts its calls and checks what it is given."""

    def __init__(self, field):
        self.field = field
        self.calls = 0
        self.times: list[float] = []

    def __call__(self, x, t):
        assert t.shape == (x.shape[0],)
        self.calls += 1
        self.times.append(t[0].item())
        return self.field(x, t)


@pytest.mark.parametrize("name", ["euler", "heun"])
@pytest.mark.parametrize("steps", [1, 3, 10])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_constant_velocity_is_integrated_exactly(name, steps, shift):
    start = noise()
    velocity = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x0 = build_sampler(name).sample(lambda x, t: velocity.expand_as(x), start, steps=steps, shift=shift)
    torch.testing.assert_close(x0, start - velocity, rtol=0, atol=1e-13)


@pytest.mark.parametrize("steps", [1, 4])
def test_heun_integrates_a_velocity_linear_in_time_exactly(steps):
    start = noise()
    a, b = 0.7, -2.3
    x0 = build_sampler("heun").sample(lambda x, t: a + b * t.view(-1, 1, 1, 1) + 0 * x, start, steps=steps, shift=2.0)
    torch.testing.assert_close(x0, start - (a + b / 2), rtol=0, atol=1e-13)  # x(0) = x(1) - ∫0^1 v dt
    euler = build_sampler("euler").sample(lambda x, t: a + b * t.view(-1, 1, 1, 1) + 0 * x, start, steps=steps)
    assert (euler - (start - (a + b / 2))).abs().max() > 0.1 / steps


def test_euler_follows_the_straight_path_to_a_single_data_point_exactly():
    # With one data point x0 the ideal velocity at x_t is (x_t - x0) / t: constant along the path.
    data = noise(5)
    start = noise(6)
    x0 = build_sampler("euler").sample(lambda x, t: (x - data) / t.view(-1, 1, 1, 1), start, steps=7, shift=3.0)
    torch.testing.assert_close(x0, data, rtol=0, atol=1e-12)
    # The solver's states are the path's points: stopping the field at t=0.5 leaves x_0.5.
    path_point = FlowPath().sample(data, start, torch.full((3,), 0.5, dtype=torch.float64)).x_t
    stopped = build_sampler("euler").sample(
        lambda x, t: (x - data) / t.view(-1, 1, 1, 1) * (t.view(-1, 1, 1, 1) > 0.5), start, steps=4)
    torch.testing.assert_close(stopped, path_point, rtol=0, atol=1e-12)


def test_convergence_orders_on_an_exponential():
    # dx/dt = x, integrated from t=1 down to t=0: x(0) = x(1)·e^-1.
    start = noise()
    exact = start * math.exp(-1)

    def error(name, steps):
        return (build_sampler(name).sample(lambda x, t: x, start, steps=steps) - exact).abs().max().item()

    assert 1.8 < error("euler", 20) / error("euler", 40) < 2.2
    assert 3.6 < error("heun", 20) / error("heun", 40) < 4.4
    assert error("heun", 20) < error("euler", 20) / 20


def test_evaluation_counts_and_times():
    start = noise()
    euler = Counting(lambda x, t: torch.zeros_like(x))
    build_sampler("euler").sample(euler, start, steps=5)
    assert euler.calls == 5 and euler.times == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    heun = Counting(lambda x, t: torch.zeros_like(x))
    build_sampler("heun").sample(heun, start, steps=2)
    assert heun.calls == 4 and heun.times == pytest.approx([1.0, 0.5, 0.5, 0.0])


def test_time_grid_is_shifted_like_training():
    grid = time_grid(4, shift=3.0)
    assert grid[0] == 1.0 and grid[-1] == 0.0 and len(grid) == 5
    assert grid[2] == pytest.approx(0.75)
    assert time_grid(4) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_times_given_to_a_bf16_model_stay_float32():
    seen = []
    build_sampler("euler").sample(lambda x, t: seen.append(t.dtype) or torch.zeros_like(x), noise().bfloat16(), steps=2)
    assert seen == [torch.float32, torch.float32]


def test_bad_names_and_steps_are_refused():
    with pytest.raises(ValueError, match="choose one of: euler, heun"):
        build_sampler("eulr")
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        build_sampler("euler").sample(lambda x, t: x, noise(), steps=0)


def test_guided():
    cond, uncond = torch.tensor([2.0, 1.0]), torch.tensor([1.0, 3.0])
    assert torch.equal(guided(cond, uncond, 1.0), cond)
    assert torch.equal(guided(cond, uncond, 0.0), uncond)
    assert torch.equal(guided(cond, uncond, 3.0), torch.tensor([4.0, -3.0]))


class Recorder(torch.nn.Module):
    """A stand-in model whose velocity depends on every input, recording its batch sizes."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def forward(self, x, t, txt, vec):
        self.batches.append(x.shape[0])
        return x * t.view(-1, 1, 1, 1) + txt.mean(dim=(1, 2)).view(-1, 1, 1, 1) + vec.sum(dim=1).view(-1, 1, 1, 1)


def test_cfg_velocity_batches_cond_and_uncond_in_one_forward():
    generator = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 2, 4, 4, generator=generator), torch.rand(3, generator=generator)
    txt, vec = torch.randn(3, 5, 8, generator=generator), torch.randn(3, 6, generator=generator)
    null_txt, null_vec = torch.randn(1, 5, 8, generator=generator), torch.randn(1, 6, generator=generator)
    model = Recorder()
    v = cfg_velocity(model, txt, vec, null_txt, null_vec, scale=4.0)(x, t)
    assert model.batches == [6]
    expected = guided(model(x, t, txt, vec), model(x, t, null_txt.expand(3, -1, -1), null_vec.expand(3, -1)), 4.0)
    torch.testing.assert_close(v, expected)
    model.batches.clear()
    unguided = cfg_velocity(model, txt, vec, null_txt, null_vec, scale=1.0)(x, t)
    torch.testing.assert_close(unguided, model(x, t, txt, vec))
    assert model.batches == [3, 3]
    with pytest.raises(ValueError, match="null prompt"):
        cfg_velocity(model, txt, vec, null_txt[:, :4], null_vec, scale=2.0)


def test_cfg_sampling_with_an_mmdit_matches_separate_passes():
    cfg = mmdit_config("tiny")
    model = MMDiT(cfg)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    txt, vec = torch.randn(2, 5, cfg.txt_dim, generator=generator), torch.randn(2, cfg.vec_dim, generator=generator)
    null_txt, null_vec = torch.zeros(1, 5, cfg.txt_dim), torch.zeros(1, cfg.vec_dim)
    start = torch.randn(2, cfg.in_channels, 8, 8, generator=generator)

    def separate(x, t):
        return guided(model(x, t, txt, vec), model(x, t, null_txt.expand(2, -1, -1), null_vec.expand(2, -1)), 2.5)

    with torch.no_grad():
        batched = build_sampler("heun").sample(cfg_velocity(model, txt, vec, null_txt, null_vec, 2.5), start, steps=3)
        reference = build_sampler("heun").sample(separate, start, steps=3)
    torch.testing.assert_close(batched, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batched, start)
