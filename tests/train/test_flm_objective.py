"""flowmill.train.flm_objective: FLM loss and sampler, FMLM corrector and student, on a two-pattern toy set.

The data set has two sequences that differ at every position, so the clean marginal of each
token is a 50/50 mix: a one-step FLM sampler mixes the patterns, a many-step one (or a distilled
flow map) must pick one per sample.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from flowmill.models.flow_lm import FlowLM, continuous_time, discrete_time, paper_time_to_flowmill
from flowmill.train import flm_objective as flm
from tests.toy_language import (
    BATCH,
    CONFIG,
    PATTERNS,
    L,
    V,
    one_thread_per_module,  # noqa: F401 - an autouse fixture, active once imported
    pattern_rate,
)


def train(model: torch.nn.Module, loss_fn, steps: int, lr: float, seed: int) -> list[float]:
    """AdamW on pattern batches; returns the per-step value of ``loss_fn``'s main metric."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    history = []
    for _ in range(steps):
        tokens = PATTERNS[torch.randint(0, 2, (BATCH,), generator=generator)]
        loss, metrics = loss_fn(model, tokens, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(metrics.get("ce", metrics.get("distill_error")).item())
    return history


def window_mean(history: list[float], start: int, stop: int) -> float:
    return sum(history[start:stop]) / len(history[start:stop])


def full_jump_error(loss_fn) -> float:
    """Distillation error on a fixed set of whole-path jumps (noise → data), the one-step regime.

    Per-step training errors are dominated by short jumps, where the models start out right;
    ``boundary_prob=1`` makes every jump the one the one-step sampler takes.
    """
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        _, metrics = loss_fn(PATTERNS.repeat(64, 1), generator, 1.0)
    return metrics["distill_error"].item()


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    model = FlowLM(CONFIG)
    history = train(model, flm.flm_loss, steps=250, lr=3e-3, seed=0)
    model.requires_grad_(False)
    return model, history


@pytest.fixture(scope="module")
def corrector(teacher):
    model = FlowLM(dataclasses.replace(CONFIG, flow_map=True, learned_loss_weight=True))
    model.init_from_teacher(teacher[0], zero_head=True)

    def error(tokens, generator, boundary_prob):
        return flm.fmlm_corrector_loss(model, teacher[0], tokens, generator, boundary_prob)

    before = full_jump_error(error)
    train(model, lambda m, tokens, g: flm.fmlm_corrector_loss(m, teacher[0], tokens, g), steps=300, lr=1e-3, seed=1)
    model.requires_grad_(False)
    return model, before, full_jump_error(error)


def test_corrupt_endpoints_and_paper_interpolation():
    tokens = PATTERNS
    onehot = torch.nn.functional.one_hot(tokens, V).float()
    x_0, x0 = flm.corrupt(tokens, torch.zeros(2), V, torch.Generator().manual_seed(0))
    assert torch.equal(x0, onehot) and torch.equal(x_0, onehot)  # flowmill t = 0 is the clean one-hot
    x_1, _ = flm.corrupt(tokens, torch.ones(2), V, torch.Generator().manual_seed(0))
    noise = torch.randn(onehot.shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x_1, noise)  # t = 1 is pure noise
    gamma = torch.tensor([0.3, 0.8])  # the paper's data weight: (1 - gamma)·noise + gamma·x0
    x_t, _ = flm.corrupt(tokens, paper_time_to_flowmill(gamma), V, torch.Generator().manual_seed(0))
    paper = (1 - gamma)[:, None, None] * noise + gamma[:, None, None] * onehot
    assert torch.allclose(x_t, paper, atol=1e-6)


def test_implied_velocity_of_the_true_clean_data_is_noise_minus_data():
    generator = torch.Generator().manual_seed(0)
    x0 = torch.nn.functional.one_hot(PATTERNS, V).float()
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.tensor([0.3, 0.9])
    x_t = (1 - t)[:, None, None] * x0 + t[:, None, None] * noise
    velocity = flm.implied_velocity(1e4 * x0, x_t, t)  # logits whose softmax is the one-hot
    assert torch.allclose(velocity, noise - x0, atol=1e-3)


def test_stratified_clock_and_grid():
    clock = flm.stratified_clock(16, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert torch.equal(torch.sort((clock * 16).floor()).values, torch.arange(16, dtype=torch.float64))
    assert torch.equal(clock, flm.stratified_clock(16, torch.Generator().manual_seed(0), torch.device("cpu")))
    grid = flm.clock_grid(4, V)
    assert grid[0] == 1.0 and grid[-1] == 0.0 and (grid.diff() < 0).all()
    assert torch.allclose(discrete_time(grid, V), torch.linspace(1, 0, 5, dtype=torch.float64), atol=1e-6)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        flm.clock_grid(0, V)


def test_flm_loss_decreases(teacher):
    _, history = teacher
    assert abs(history[0] - math.log(V)) < 0.05  # zero head: uniform prediction
    assert window_mean(history, -50, None) < 0.35  # the floor is the ambiguity of the noisiest times


def test_validation_ce_goes_from_the_marginal_to_zero(teacher):
    model, _ = teacher
    grid = torch.tensor([1.0, 0.6, 0.4, 0.05])
    ce = flm.validation_ce(model, PATTERNS.repeat(8, 1), grid, torch.Generator().manual_seed(3))
    assert ce.shape == (4,)
    # Pure noise: each token is a coin flip between two patterns; nothing beats log 2, uniform is log V.
    assert math.log(2) - 0.1 < ce[0] < math.log(V) - 0.8
    assert ce[0] > ce[1] > ce[2] > ce[3] - 0.01 and ce[3] < 0.05  # sharper as noise goes


def test_flm_sampling_is_seeded_and_reproduces_the_patterns(teacher):
    model, _ = teacher
    samples = flm.sample_flm(model, 64, 16, torch.Generator().manual_seed(1))
    assert samples.shape == (64, L) and samples.dtype == torch.long
    assert torch.equal(samples, flm.sample_flm(model, 64, 16, torch.Generator().manual_seed(1)))
    assert not torch.equal(samples, flm.sample_flm(model, 64, 16, torch.Generator().manual_seed(2)))
    assert pattern_rate(samples) > 0.9
    hits = (samples[:, None, :] == PATTERNS[None]).all(-1).float().mean(0)
    assert (hits > 0.2).all()  # both patterns, not one collapsed mode
    assert pattern_rate(flm.sample_flm(model, 64, 1, torch.Generator().manual_seed(1))) < 0.3  # one step mixes them


def test_corrector_starts_as_a_teacher_euler_step_and_learns(teacher, corrector):
    teacher_model, _ = teacher
    fresh = FlowLM(dataclasses.replace(CONFIG, flow_map=True))
    fresh.init_from_teacher(teacher_model, zero_head=True)
    x_t, t, s = torch.randn(2, L, V), torch.tensor([0.9, 0.4]), torch.tensor([0.3, 0.0])
    euler = x_t + (s - t)[:, None, None] * flm.implied_velocity(teacher_model(x_t, t), x_t, t)
    assert torch.allclose(flm.corrected_flow_map(teacher_model, fresh, x_t, t, s), euler)

    _, before, after = corrector
    assert after < 0.9 * before  # measured: 0.21 → 0.17
    one_step = pattern_rate(flm.sample_corrected(teacher_model, corrector[0], 128, 1, torch.Generator().manual_seed(1)))
    teacher_one_step = pattern_rate(flm.sample_flm(teacher_model, 128, 1, torch.Generator().manual_seed(1)))
    assert one_step > teacher_one_step + 0.15


def test_student_distills_the_corrected_map(teacher, corrector):
    teacher_model, corrector_model = teacher[0], corrector[0]
    torch.manual_seed(5)
    student = FlowLM(dataclasses.replace(CONFIG, flow_map=True))
    student.init_from_teacher(teacher_model, zero_head=False)
    for steps in (1, 2, 4):  # a fresh student is the teacher's Euler sampler
        expected = flm.sample_flm(teacher_model, 16, steps, torch.Generator().manual_seed(7))
        assert torch.equal(flm.sample_fmlm(student, 16, steps, torch.Generator().manual_seed(7)), expected)

    def error(tokens, generator, boundary_prob):
        return flm.fmlm_distill_loss(student, teacher_model, corrector_model, tokens, generator, boundary_prob)

    before = full_jump_error(error)
    train(
        student,
        lambda m, tokens, g: flm.fmlm_distill_loss(m, teacher_model, corrector_model, tokens, g),
        steps=300,
        lr=1e-3,
        seed=2,
    )
    assert full_jump_error(error) < 0.8 * before
    teacher_one_step = pattern_rate(flm.sample_flm(teacher_model, 128, 1, torch.Generator().manual_seed(1)))
    for steps in (1, 2, 4):
        samples = flm.sample_fmlm(student, 128, steps, torch.Generator().manual_seed(1))
        assert samples.shape == (128, L)
        assert pattern_rate(samples) > teacher_one_step + 0.1


def test_data_free_states_lie_on_the_teachers_flow(teacher, corrector):
    """distill.data_free: a jump's start is the teacher's Euler flow from noise, whatever the batch's tokens."""
    teacher_model = teacher[0]
    noise = torch.randn(64, L, V, generator=torch.Generator().manual_seed(4))
    clock = torch.full((64,), 0.5, dtype=torch.float64)
    assert torch.equal(flm.teacher_flow_states(teacher_model, noise, torch.ones(64, dtype=torch.float64), 4), noise)
    t = continuous_time(clock, V).float()
    one = flm.teacher_flow_states(teacher_model, noise, clock, 1)
    torch.testing.assert_close(one, noise + (t - 1)[:, None, None] * flm.implied_velocity(teacher_model(noise, torch.ones(64)), noise, torch.ones(64)))
    # Near data, a 16-step flow's states are the teacher's samples: it reads whole patterns off them.
    near = torch.full((64,), 0.05, dtype=torch.float64)
    near_data = flm.teacher_flow_states(teacher_model, noise, near, 16)
    assert pattern_rate(teacher_model(near_data, continuous_time(near, V).float()).argmax(-1)) > 0.85
    starts = [flm.start_states(teacher_model, tokens, clock, t, torch.Generator().manual_seed(4), flow_steps=4)
              for tokens in (PATTERNS.repeat(32, 1), torch.zeros(64, L, dtype=torch.long))]
    torch.testing.assert_close(starts[0], starts[1])  # no data is read
    torch.testing.assert_close(starts[0], flm.teacher_flow_states(teacher_model, noise, clock, 4))
    loss, _ = flm.fmlm_corrector_loss(corrector[0], teacher_model, PATTERNS.repeat(4, 1), torch.Generator().manual_seed(0), flow_steps=2)
    assert torch.isfinite(loss)
