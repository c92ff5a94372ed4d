"""ODE solvers on velocity fields with known solutions, classifier-free guidance and RAAG."""

from __future__ import annotations

import math

import pytest
import torch

from flowmill.models.flow_path import FlowPath
from flowmill.models.mmdit import MMDiT, mmdit_config
from flowmill.models.samplers import (
    ConstantGuidance,
    RatioAwareGuidance,
    build_guidance,
    build_sampler,
    cfg_velocity,
    guided,
    time_grid,
)

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
    v = cfg_velocity(model, txt, vec, null_txt, null_vec, 4.0)(x, t)
    assert model.batches == [6]
    expected = guided(model(x, t, txt, vec), model(x, t, null_txt.expand(3, -1, -1), null_vec.expand(3, -1)), 4.0)
    torch.testing.assert_close(v, expected)
    model.batches.clear()
    unguided = cfg_velocity(model, txt, vec, null_txt, null_vec, 1.0)(x, t)
    torch.testing.assert_close(unguided, model(x, t, txt, vec))
    assert model.batches == [3, 3]
    with pytest.raises(ValueError, match="null prompt"):
        cfg_velocity(model, txt, vec, null_txt[:, :4], null_vec, 2.0)


def random_mmdit():
    """A tiny MMDiT with random weights (not zero-initialised, so the prompts matter) and inputs for it."""
    cfg = mmdit_config("tiny")
    model = MMDiT(cfg)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    txt, vec = torch.randn(2, 5, cfg.txt_dim, generator=generator), torch.randn(2, cfg.vec_dim, generator=generator)
    null_txt, null_vec = torch.zeros(1, 5, cfg.txt_dim), torch.zeros(1, cfg.vec_dim)
    start = torch.randn(2, cfg.in_channels, 8, 8, generator=generator)
    return model, txt, vec, null_txt, null_vec, start


def test_cfg_sampling_with_an_mmdit_matches_separate_passes():
    model, txt, vec, null_txt, null_vec, start = random_mmdit()

    def separate(x, t):
        return guided(model(x, t, txt, vec), model(x, t, null_txt.expand(2, -1, -1), null_vec.expand(2, -1)), 2.5)

    with torch.no_grad():
        batched = build_sampler("heun").sample(cfg_velocity(model, txt, vec, null_txt, null_vec, 2.5), start, steps=3)
        reference = build_sampler("heun").sample(separate, start, steps=3)
    torch.testing.assert_close(batched, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batched, start)


def pair_with_ratios(ratios: list[float], shape=(3, 4, 4)) -> tuple[torch.Tensor, torch.Tensor]:
    """(v_cond, v_uncond), one sample per ratio, with ||v_cond - v_uncond|| / ||v_uncond|| = ratio exactly."""
    generator = torch.Generator().manual_seed(0)
    v_uncond = torch.randn(len(ratios), *shape, generator=generator, dtype=torch.float64)
    direction = torch.randn(len(ratios), *shape, generator=generator, dtype=torch.float64)
    direction = direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    scale = torch.tensor(ratios, dtype=torch.float64) * v_uncond.flatten(1).norm(dim=1)
    return (v_uncond + scale.view(-1, 1, 1, 1) * direction).float(), v_uncond.float()


def test_raag_scale_falls_from_w_max_to_one_as_the_ratio_grows():
    ratios = [0.0, 0.05, 0.2, 1.0, 50.0]
    v_cond, v_uncond = pair_with_ratios(ratios)
    raag = RatioAwareGuidance(w_max=5.0, alpha=12.0)
    torch.testing.assert_close(raag.ratio(v_cond, v_uncond), torch.tensor(ratios), rtol=1e-5, atol=1e-6)
    scales = raag.scales(v_cond, v_uncond)
    expected = 1 + 4.0 * torch.exp(-12.0 * torch.tensor(ratios))  # the closed form: w = 1 + (w_max - 1)·exp(-alpha·ratio)
    torch.testing.assert_close(scales, expected, rtol=1e-5, atol=1e-6)
    assert scales[0] == pytest.approx(5.0)  # the predictions agree: the full scale
    assert scales[-1] == pytest.approx(1.0)  # the ratio spikes: no extra guidance, v is v_cond
    assert torch.all(scales[:-1] > scales[1:])  # monotone in the ratio
    guided_v = raag(v_cond, v_uncond)
    for index, scale in enumerate(scales.tolist()):  # each sample guided with its own scale
        torch.testing.assert_close(guided_v[index], guided(v_cond[index], v_uncond[index], scale))
    torch.testing.assert_close(guided_v[-1], v_cond[-1], rtol=1e-4, atol=1e-4)


def test_raag_scale_of_a_sample_does_not_depend_on_its_batch():
    v_cond, v_uncond = pair_with_ratios([0.1, 3.0])
    raag = RatioAwareGuidance(w_max=4.0, alpha=2.0)
    together = raag(v_cond, v_uncond)
    torch.testing.assert_close(together[:1], raag(v_cond[:1], v_uncond[:1]))
    torch.testing.assert_close(together[1:], raag(v_cond[1:], v_uncond[1:]))


def test_raag_with_alpha_zero_is_constant_cfg_and_with_w_max_one_no_guidance():
    generator = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 2, 4, 4, generator=generator), torch.rand(3, generator=generator)
    txt, vec = torch.randn(3, 5, 8, generator=generator), torch.randn(3, 6, generator=generator)
    null_txt, null_vec = torch.randn(1, 5, 8, generator=generator), torch.randn(1, 6, generator=generator)
    model = Recorder()
    constant = cfg_velocity(model, txt, vec, null_txt, null_vec, ConstantGuidance(3.0))(x, t)
    torch.testing.assert_close(cfg_velocity(model, txt, vec, null_txt, null_vec, RatioAwareGuidance(3.0, 0.0))(x, t),
                               constant, rtol=0, atol=0)
    adaptive = cfg_velocity(model, txt, vec, null_txt, null_vec, RatioAwareGuidance(3.0, 12.0))(x, t)
    assert not torch.allclose(adaptive, constant)
    model.batches.clear()
    unguided = cfg_velocity(model, txt, vec, null_txt, null_vec, RatioAwareGuidance(1.0, 12.0))(x, t)
    assert model.batches == [3]  # scale 1 whatever the ratio: the unconditional half is skipped
    torch.testing.assert_close(unguided, model(x, t, txt, vec))


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_raag_sampling_with_an_mmdit_matches_the_formula_at_every_evaluation(sampler):
    model, txt, vec, null_txt, null_vec, start = random_mmdit()
    w_max, alpha = 4.0, 3.0
    seen = []

    def separate(x, t):
        v_cond = model(x, t, txt, vec)
        v_uncond = model(x, t, null_txt.expand(2, -1, -1), null_vec.expand(2, -1))
        ratio = (v_cond - v_uncond).flatten(1).norm(dim=1) / v_uncond.flatten(1).norm(dim=1)
        scale = 1 + (w_max - 1) * torch.exp(-alpha * ratio)
        seen.append(scale)
        return v_uncond + scale.view(-1, 1, 1, 1) * (v_cond - v_uncond)

    raag = RatioAwareGuidance(w_max, alpha)
    with torch.no_grad():
        adaptive = build_sampler(sampler).sample(cfg_velocity(model, txt, vec, null_txt, null_vec, raag), start, steps=3)
        reference = build_sampler(sampler).sample(separate, start, steps=3)
        constant = build_sampler(sampler).sample(cfg_velocity(model, txt, vec, null_txt, null_vec, w_max), start, steps=3)
    torch.testing.assert_close(adaptive, reference, rtol=1e-5, atol=1e-5)
    assert len(seen) == {"euler": 3, "heun": 6}[sampler]  # guidance at every velocity evaluation
    assert all(torch.all((1 <= scale) & (scale <= w_max)) for scale in seen)
    assert not torch.allclose(adaptive, constant, atol=1e-4)


@pytest.mark.parametrize(
    "w_max, alpha, message",
    [(0.5, 12.0, "w_max must be a finite number >= 1, got 0.5"), (float("inf"), 1.0, "w_max must be"),
     (3.0, -1.0, "alpha must be a finite number >= 0, got -1.0"), (3.0, float("nan"), "alpha must be")],
)
def test_raag_parameters_out_of_range_are_refused(w_max, alpha, message):
    with pytest.raises(ValueError, match=message):
        RatioAwareGuidance(w_max, alpha)
    with pytest.raises(ValueError, match=message):
        build_guidance("raag", w_max, alpha)


def test_build_guidance():
    assert build_guidance("cfg", 2.0, 12.0) == ConstantGuidance(2.0)
    assert build_guidance("cfg", 0.5, -1.0) == ConstantGuidance(0.5)  # constant CFG takes any scale; alpha is unused
    assert build_guidance("raag", 18.0, 12.0) == RatioAwareGuidance(w_max=18.0, alpha=12.0)
    with pytest.raises(ValueError, match="unknown guidance 'raga'; choose one of: cfg, raag"):
        build_guidance("raga", 3.0, 12.0)
