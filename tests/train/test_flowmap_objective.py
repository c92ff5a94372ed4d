"""flowmill.train.flowmap_objective: the LSD derivative against finite differences, the losses'
targets on the diagonal, and a map on a 2-D toy (two Gaussians) that jumps from noise to the data
in one step, distilled from the exact velocity of the toy."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from flowmill.models.flow_map import jump
from flowmill.train.flowmap_objective import draw_jumps, end_time_derivative, flow_map_loss, flow_states

MEANS = torch.tensor([[2.0, 0.0], [-2.0, 0.0]])  # the toy: an even mix of N(±(2, 0), SIGMA²·I)
SIGMA = 0.25


class MLPMap(nn.Module):
    """u(x, t, s) for 2-D points: an MLP of (x, t, t - s)."""

    def __init__(self, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2))

    def forward(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, t[:, None].to(x.dtype), (t - s)[:, None].to(x.dtype)], dim=1))


def toy_data(count: int, generator: torch.Generator) -> torch.Tensor:
    component = torch.randint(0, 2, (count,), generator=generator)
    return MEANS[component] + SIGMA * torch.randn(count, 2, generator=generator)


def toy_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The exact flow velocity E[noise - x0 | x_t] of the toy at (B, 2) points and times (B,)."""
    t = t[:, None]
    centres = (1 - t)[:, None] * MEANS[None]  # (B, 2 components, 2)
    variance = (1 - t) ** 2 * SIGMA**2 + t**2  # (B, 1)
    offset = x[:, None] - centres
    weights = (-(offset**2).sum(-1) / (2 * variance)).softmax(-1)[..., None]  # (B, 2, 1)
    x0 = MEANS[None] + ((1 - t) * SIGMA**2 / variance)[:, None] * offset
    noise = (t / variance)[:, None] * offset
    return (weights * (noise - x0)).sum(1)


def wasserstein2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Exact W2 between two equal-size point clouds (N, 2): the optimal matching's root mean squared distance."""
    cost = torch.cdist(a.double(), b.double()) ** 2
    rows, cols = linear_sum_assignment(cost.numpy())
    return float(cost[rows, cols].mean().sqrt())


def test_the_lsd_derivative_matches_finite_differences():
    torch.manual_seed(0)
    net = MLPMap(32).double()
    x = torch.randn(6, 2, dtype=torch.float64)
    t = torch.rand(6, dtype=torch.float64)
    s = t * torch.rand(6, dtype=torch.float64)
    landed, derivative = end_time_derivative(net, x, t, s)
    step = 1e-6
    finite = (jump(net(x, t, s + step), x, t, s + step) - jump(net(x, t, s - step), x, t, s - step)) / (2 * step)
    torch.testing.assert_close(derivative, finite, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(landed, jump(net(x, t, s), x, t, s))
    # Both carry gradients to the network; on the diagonal the derivative is the velocity u(x, t, t).
    derivative.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    _, on_diagonal = end_time_derivative(net, x, t, t)
    torch.testing.assert_close(on_diagonal, net(x, t, t))


@pytest.mark.parametrize("objective", ["lsd", "psd"])
def test_the_empty_jumps_learn_the_velocity_and_a_perfect_map_has_zero_loss(objective):
    generator = torch.Generator().manual_seed(0)
    times = draw_jumps(16, generator, torch.device("cpu"), diagonal_share=0.25)
    assert times.diagonal.sum() == 4 and torch.equal(times.s[times.diagonal], times.t[times.diagonal])
    assert (times.s[~times.diagonal] < times.t[~times.diagonal]).all()
    from_noise = draw_jumps(16, torch.Generator().manual_seed(0), torch.device("cpu"), 0.25, noise_start_share=0.5)
    assert torch.equal(from_noise.diagonal, times.diagonal) and from_noise.t[4:12].eq(1).all()
    torch.testing.assert_close(from_noise.t - from_noise.s, times.t - times.s)  # the same lengths, moved to start at 1
    assert torch.equal(from_noise.t[12:], times.t[12:])
    x_t = torch.randn(16, 2, generator=generator)

    def constant(x, t, s):  # the exact map of the constant velocity field 1
        return torch.ones_like(x)

    loss, metrics = flow_map_loss(objective, constant, x_t, times, lambda x, t: torch.ones_like(x))
    assert loss.item() < 1e-12 and set(metrics) == {"diagonal_loss", "jump_loss"}
    flow_target = torch.full_like(x_t, 3.0)  # flow matching on the empty jumps replaces the velocity there
    _, metrics = flow_map_loss(objective, constant, x_t, times, lambda x, t: torch.ones_like(x), flow_target)
    assert metrics["diagonal_loss"].item() == pytest.approx(4.0) and metrics["jump_loss"].item() < 1e-12
    with pytest.raises(ValueError, match="unknown flow-map objective 'esd'; choose one of: lsd, psd"):
        flow_map_loss("esd", constant, x_t, times, lambda x, t: x)


def test_data_free_states_follow_the_flow_from_noise():
    noise = torch.randn(5, 2)
    t = torch.tensor([1.0, 0.8, 0.5, 0.2, 0.0])
    x_t = flow_states(lambda x, time: torch.full_like(x, 2.0), noise, t, steps=4)
    torch.testing.assert_close(x_t, noise + 2.0 * (t - 1)[:, None])


def test_a_map_distilled_by_lsd_jumps_from_noise_to_two_gaussians_in_one_step(one_thread):
    """600 LSD steps from the toy's data and exact velocity: one jump from noise lands within W2 0.45
    of the toy (400 points each; the noise itself is 1.5 away, a second draw of the toy 0.25)."""
    torch.manual_seed(0)
    net = MLPMap()
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    steps = 600
    for index in range(steps):
        times = draw_jumps(256, generator, torch.device("cpu"), diagonal_share=0.25)
        x0, noise = toy_data(256, generator), torch.randn(256, 2, generator=generator)
        x_t = (1 - times.t[:, None]) * x0 + times.t[:, None] * noise
        loss, _ = flow_map_loss("lsd", net, x_t, times, toy_velocity)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for group in optimizer.param_groups:
            group["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * (index + 1) / steps))
    evaluation = torch.Generator().manual_seed(1)
    noise, target, second = torch.randn(400, 2, generator=evaluation), toy_data(400, evaluation), toy_data(400, evaluation)
    ones, zeros = torch.ones(400), torch.zeros(400)
    with torch.no_grad():
        one_jump = jump(net(noise, ones, zeros), noise, ones, zeros)
    assert wasserstein2(second, target) < 0.3 < 1.4 < wasserstein2(noise, target)
    assert wasserstein2(one_jump, target) < 0.45
