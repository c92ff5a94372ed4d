"""Objectives of flow-map training (``task: mmdit_flowmap``), over any average-velocity network.

flowmill's convention (flowmill.models.flow_map): t = 0 is data, t = 1 is noise, a jump goes
from a start time t down to an end time s <= t, X(x; t→s) = x + (s - t)·u(x, t, s), and
u(x, t, t) is the velocity. After "How to build a consistency model: learning flow maps via
self-distillation" (Boffi et al., 2025; github.com/nmboffi/flow-maps):

* **LSD** (Lagrangian self-distillation): the map's derivative in its end time is the velocity
  where it lands, ∂_s X(x; t→s) = v(X(x; t→s), s). The derivative comes from one forward-mode
  pass (``torch.func.jvp`` in s); the velocity target, without gradient, is a teacher's or the
  network's own diagonal u(·, s, s).
* **PSD** (progressive self-distillation, the semigroup property): one jump t→s equals two
  half jumps t→m→s, m = (t + s)/2; the two half jumps, without gradient, are the target.

Both losses are in velocity units, squared and averaged per element: the jump's average
velocity (LSD: its end-time derivative) against the target's. The rows of a batch whose jump
is empty (s = t, ``JumpTimes.diagonal``) learn the velocity itself: the flow-matching target
noise - x0 when learning from data alone, else the teacher's velocity. For LSD such a row
needs no special case: ∂_s X at s = t is u(x, t, t).

A network here is ``net(x, t, s) -> u`` shaped like x (B, ...), t and s (B,); a velocity
``velocity(x, t) -> v``. Conditioning is closed over by the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from flowmill.models.flow_map import AverageVelocity, jump, per_row
from flowmill.models.layers import forward_differentiable
from flowmill.models.samplers import Velocity
from flowmill.train.flm_objective import sample_jumps

OBJECTIVES = ("lsd", "psd")
BOUNDARY_PROB = 1 / 32  # share of off-diagonal jumps that are the whole path, noise (1) → data (0)
MIN_JUMP = 1e-3  # shortest off-diagonal jump


@dataclass(frozen=True)
class JumpTimes:
    """Start times t, end times s (B,) float32 of one batch's jumps, s <= t, and which rows are empty jumps."""

    t: torch.Tensor
    s: torch.Tensor
    diagonal: torch.Tensor  # (B,) bool: s = t, the row learns the velocity


def draw_jumps(batch: int, generator: torch.Generator, device: torch.device, diagonal_share: float,
               noise_start_share: float = 0.0, boundary_prob: float = BOUNDARY_PROB, min_jump: float = MIN_JUMP
               ) -> JumpTimes:
    """The jumps of a batch: the first round(diagonal_share·B) rows empty (s = t, t uniform in
    [0, 1]), the next round(noise_start_share·B) starting from pure noise (t = 1), the others drawn
    as FMLM draws its jumps (flowmill.train.flm_objective.sample_jumps: length stratified-uniform,
    start uniform where the jump fits, sometimes the whole path).

    Every sampling's first jump starts at t = 1, and one jump is the whole of a 1-step sample;
    LSD makes X(x; 1→0) right only by training its end-time derivative along all of [0, 1] from
    that start, which the uniform starts reach rarely."""
    start, end = sample_jumps(batch, generator, device, boundary_prob, min_jump)
    row = torch.arange(batch, device=device)
    diagonal = row < round(diagonal_share * batch)
    from_noise = ~diagonal & (row < round(diagonal_share * batch) + round(noise_start_share * batch))
    end = torch.where(from_noise, end + (1.0 - start), end)  # the same length, moved to start at t = 1
    start = torch.where(from_noise, torch.ones_like(start), start)
    end = torch.where(diagonal, start, end)
    return JumpTimes(start.float(), end.float(), diagonal)


def end_time_derivative(net: AverageVelocity, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(X(x_t; t→s), ∂_s X(x_t; t→s)), both shaped like x_t, by one forward-mode pass in s
    (``torch.func.jvp``); both carry reverse-mode gradients to the network's parameters."""
    def landing(end: torch.Tensor) -> torch.Tensor:
        return jump(net(x_t, t, end), x_t, t, end)

    with forward_differentiable():
        return torch.func.jvp(landing, (s,), (torch.ones_like(s),))


def _row_mean(error: torch.Tensor) -> torch.Tensor:
    return error.float().pow(2).flatten(1).mean(dim=1)  # (B,)


def _metrics(per_row_loss: torch.Tensor, diagonal: torch.Tensor) -> dict:
    """Detached means of the per-row loss over the empty jumps and over the others."""
    detached = per_row_loss.detach()
    out = {}
    if diagonal.any():
        out["diagonal_loss"] = detached[diagonal].mean()
    if (~diagonal).any():
        out["jump_loss"] = detached[~diagonal].mean()
    return out


def lsd_loss(net: AverageVelocity, x_t: torch.Tensor, times: JumpTimes, velocity: Velocity,
             flow_target: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Scalar LSD loss and metrics: ||∂_s X(x_t; t→s) - velocity(X(x_t; t→s), s)||² per element,
    the velocity without gradient. ``flow_target`` (shaped like x_t), when given, replaces the
    velocity target on the empty jumps (flow matching from data, noise - x0)."""
    landed, derivative = end_time_derivative(net, x_t, times.t, times.s)
    with torch.no_grad():
        target = velocity(landed.detach(), times.s)
        if flow_target is not None:
            target = torch.where(per_row(times.diagonal, target).bool(), flow_target, target)
    per_row_loss = _row_mean(derivative - target)
    return per_row_loss.mean(), _metrics(per_row_loss, times.diagonal)


def psd_loss(net: AverageVelocity, x_t: torch.Tensor, times: JumpTimes, velocity: Velocity,
             flow_target: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Scalar PSD loss and metrics: u(x_t, t, s) against the average velocity of two half jumps
    t→m→s of the network itself (without gradient); on the empty jumps against
    ``velocity(x_t, t)``, or ``flow_target`` when given."""
    average = net(x_t, times.t, times.s)
    target = psd_target(net, x_t, times, velocity, flow_target)
    per_row_loss = _row_mean(average - target)
    return per_row_loss.mean(), _metrics(per_row_loss, times.diagonal)


@torch.no_grad()
def psd_target(net: AverageVelocity, x_t: torch.Tensor, times: JumpTimes, velocity: Velocity,
               flow_target: torch.Tensor | None = None) -> torch.Tensor:
    """PSD's target for u(x_t, t, s), without gradient: the average velocity of the two half jumps
    t→m→s of ``net``, and on the empty jumps ``velocity(x_t, t)``, or ``flow_target`` when given."""
    t, s = times.t, times.s
    on_diagonal = flow_target if flow_target is not None else velocity(x_t, t)
    middle = 0.5 * (t + s)
    x_mid = jump(net(x_t, t, middle), x_t, t, middle)
    x_end = jump(net(x_mid, middle, s), x_mid, middle, s)
    length = torch.where(times.diagonal, torch.ones_like(t), s - t)  # no division by zero on the diagonal
    target = (x_end - x_t) / per_row(length, x_t)
    return torch.where(per_row(times.diagonal, target).bool(), on_diagonal, target)


LOSSES: dict[str, Callable[..., tuple[torch.Tensor, dict]]] = {"lsd": lsd_loss, "psd": psd_loss}


def flow_map_loss(objective: str, net: AverageVelocity, x_t: torch.Tensor, times: JumpTimes, velocity: Velocity,
                  flow_target: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """The loss ``objective`` (lsd | psd) names; ValueError listing both for another name."""
    if objective not in LOSSES:
        raise ValueError(f"unknown flow-map objective {objective!r}; choose one of: {', '.join(OBJECTIVES)}")
    return LOSSES[objective](net, x_t, times, velocity, flow_target)


@torch.no_grad()
def flow_states(velocity: Velocity, noise: torch.Tensor, t: torch.Tensor, steps: int) -> torch.Tensor:
    """States at times t (B,) on the flow of ``velocity`` from ``noise`` (B, ...) at t = 1: ``steps``
    Euler steps per row, each row on its own evenly spaced grid from 1 to its t (the data-free
    distillation's states: no data, only the prior the flow starts from)."""
    x = noise
    for index in range(steps):
        start = 1 - (1 - t) * index / steps
        end = 1 - (1 - t) * (index + 1) / steps
        x = x + per_row(end - start, x) * velocity(x, start)
    return x
