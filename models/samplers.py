"""ODE solvers from noise (t = 1) to data (t = 0) over a velocity field, and guidance.

A velocity function is ``velocity(x, t) -> v`` with x (B, ...), t (B,) and v shaped like
x; with flowmill's convention (x_t = (1 - t)·x0 + t·noise) it is dx/dt, so integrating
from t = 1 down to t = 0 turns noise into data.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from flowmill.models.flow_path import shift_time

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def time_grid(steps: int, shift: float = 1.0) -> list[float]:
    """steps + 1 times from 1 down to 0, evenly spaced, then shifted like the training times."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    uniform = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return shift_time(uniform, shift).tolist()


def _times(x: torch.Tensor, t: float) -> torch.Tensor:
    # float32 at least: a bf16 t would round 0.999 to 1.0.
    return torch.full((x.shape[0],), t, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)


class EulerSampler:
    """First order: one velocity evaluation per step."""

    def sample(self, velocity: Velocity, noise: torch.Tensor, steps: int, shift: float = 1.0) -> torch.Tensor:
        """Integrate from ``noise`` at t = 1 to t = 0 in ``steps`` steps; returns x0 shaped like noise."""
        times = time_grid(steps, shift)
        x = noise
        for t, t_next in zip(times[:-1], times[1:]):
            x = x + (t_next - t) * velocity(x, _times(x, t))
        return x


class HeunSampler:
    """Second order (explicit trapezoidal rule): two velocity evaluations per step.

    The last step also evaluates at t = 0, where a flow model's velocity is defined
    (unlike a diffusion denoiser's), so every step is second order.
    """

    def sample(self, velocity: Velocity, noise: torch.Tensor, steps: int, shift: float = 1.0) -> torch.Tensor:
        """Integrate from ``noise`` at t = 1 to t = 0 in ``steps`` steps; returns x0 shaped like noise."""
        times = time_grid(steps, shift)
        x = noise
        for t, t_next in zip(times[:-1], times[1:]):
            step = t_next - t
            v = velocity(x, _times(x, t))
            v_next = velocity(x + step * v, _times(x, t_next))
            x = x + step * 0.5 * (v + v_next)
        return x


SAMPLERS = {"euler": EulerSampler, "heun": HeunSampler}


def build_sampler(name: str):
    """The ODE solver called ``name``."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]()


def guided(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: v_uncond + scale·(v_cond - v_uncond); scale 1 is v_cond."""
    return v_uncond + scale * (v_cond - v_uncond)


def cfg_velocity(model, txt: torch.Tensor, vec: torch.Tensor, null_txt: torch.Tensor, null_vec: torch.Tensor,
                 scale: float) -> Velocity:
    """A guided velocity function over ``model(x, t, txt, vec)``.

    txt (B, L, D) and vec (B, P) are the prompts; null_txt (1 or B, L, D) and null_vec
    (1 or B, P) the empty prompt. Conditional and unconditional halves run as one batch
    of 2B; with scale 1 only the conditional half runs, since guidance is then the
    identity.
    """
    if scale == 1:
        return lambda x, t: model(x, t, txt, vec)
    batch = txt.shape[0]
    if null_txt.shape[1:] != txt.shape[1:] or null_vec.shape[1:] != vec.shape[1:]:
        raise ValueError(f"the null prompt (txt {tuple(null_txt.shape)}, vec {tuple(null_vec.shape)}) must match "
                         f"the prompts (txt {tuple(txt.shape)}, vec {tuple(vec.shape)}) except in batch")
    both_txt = torch.cat([txt, null_txt.expand(batch, *txt.shape[1:])])  # (2B, L, D)
    both_vec = torch.cat([vec, null_vec.expand(batch, *vec.shape[1:])])  # (2B, P)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_cond, v_uncond = model(torch.cat([x, x]), torch.cat([t, t]), both_txt, both_vec).chunk(2)
        return guided(v_cond, v_uncond, scale)

    return velocity
