"""Flow maps: the flow's jump from time t to time s in one network call.

flowmill's convention: t = 0 is data, t = 1 is noise, the velocity is v = noise - x0, and a
sampler jumps from t = 1 down to t = 0. A flow map X(x; t→s) carries a point x at time t
along the flow to time s. A network ``u(x, t, s)`` (an MMDiT with ``flow_map=True``) gives the
average velocity over the jump:

    X(x; t→s) = x + (s - t)·u(x, t, s)

so X(x; t→t) = x for any network, and the diagonal u(x, t, t) is the flow's velocity v(x, t)
(the limit s → t of the average). In the notation of "How to build a consistency model:
learning flow maps via self-distillation" (Boffi et al., 2025), X_{s,t}(x) = x + (t - s)·v_{s,t}(x)
with their s our start t and their t our end s.

Sampling with N jumps follows a grid from 1 to 0 (``flowmill.models.samplers.time_grid``, the
same grid an N-step Euler sampler uses); one jump on a velocity model is one Euler step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from flowmill.models.samplers import Guidance, cfg_velocity, time_grid

# u(x, t, s) -> average velocity shaped like x; x (B, ...), t and s (B,).
AverageVelocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) values shaped (B, 1, ..., 1) to broadcast over ``like`` (B, ...), in its dtype."""
    return values.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def jump(u: torch.Tensor, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """X(x; t→s) = x + (s - t)·u for an average velocity u shaped like x (B, ...), t and s (B,)."""
    return x + per_row(s - t, x) * u


class EndTime(nn.Module):
    """A flow map read as a velocity-style model at a fixed end time: ``forward(img, t, txt, vec)``
    = ``flow_map(img, t, txt, vec, s)`` with s (a number) for every row, so the guidance of
    flowmill.models.samplers applies to the average velocity as it does to a velocity."""

    def __init__(self, flow_map: nn.Module, s: float):
        super().__init__()
        self.flow_map = flow_map
        self.s = s

    def forward(self, img: torch.Tensor, t: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        return self.flow_map(img, t, txt, vec, torch.full_like(t, self.s))


def sample_jumps(model: nn.Module, noise: torch.Tensor, steps: int, txt: torch.Tensor, vec: torch.Tensor,
                 null_txt: torch.Tensor, null_vec: torch.Tensor, guidance: Guidance | float = 1.0,
                 shift: float = 1.0) -> torch.Tensor:
    """x0 shaped like ``noise`` (B, C, H, W) after ``steps`` jumps of the flow-map MMDiT ``model``
    from t = 1 to t = 0 over ``time_grid(steps, shift)``: one network call per jump, two when
    ``guidance`` (a Guidance of flowmill.models.samplers, or a constant CFG scale) is not the
    identity, which then combines the conditional and unconditional average velocities."""
    times = time_grid(steps, shift)
    x = noise
    for t, s in zip(times[:-1], times[1:]):
        average = cfg_velocity(EndTime(model, s), txt, vec, null_txt, null_vec, guidance)
        start = torch.full((x.shape[0],), t, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        x = x + (s - t) * average(x, start)
    return x


def load_velocity_weights(flow_map: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a velocity MMDiT's weights into a flow-map MMDiT of the same architecture; the jump
    embedding keeps its initialisation (a zero output layer, so the map starts as that velocity
    model). ValueError if keys other than the jump embedding's are missing or left over."""
    result = flow_map.load_state_dict(state_dict, strict=False)
    missing = [key for key in result.missing_keys if not key.startswith("embed.jump.")]
    if missing or result.unexpected_keys:
        raise ValueError(f"the velocity weights do not fit the flow map: missing {missing[:5]}, "
                         f"unexpected {result.unexpected_keys[:5]}")
