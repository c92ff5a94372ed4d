"""ODE solvers from noise (t = 1) to data (t = 0) over a velocity field, and guidance.

A velocity function is ``velocity(x, t) -> v`` with x (B, ...), t (B,) and v shaped like
x; with flowmill's convention (x_t = (1 - t)·x0 + t·noise) it is dx/dt, so integrating
from t = 1 down to t = 0 turns noise into data.

Guidance combines a conditional and an unconditional velocity into one, at every velocity
evaluation (so it works with any solver): constant classifier-free guidance, or RAAG, whose
scale follows the ratio of the two predictions (``RatioAwareGuidance``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

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


def guided(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance: v_uncond + scale·(v_cond - v_uncond); scale 1 is v_cond.

    ``scale`` is a number, or a tensor that broadcasts against the velocities (one scale per sample).
    """
    return v_uncond + scale * (v_cond - v_uncond)


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) values shaped (B, 1, ..., 1) to broadcast over ``like`` (B, ...), in its dtype."""
    return values.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


class Guidance(Protocol):
    """Combines conditional and unconditional velocities (B, ...) into the guided one (B, ...)."""

    @property
    def identity(self) -> bool:
        """True when the guided velocity is v_cond, so the unconditional half need not run."""

    def scales(self, v_cond: torch.Tensor, v_uncond: torch.Tensor) -> torch.Tensor:
        """(B,) the scale applied to each sample."""

    def __call__(self, v_cond: torch.Tensor, v_uncond: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class ConstantGuidance:
    """Classifier-free guidance with one scale at every step (1: the conditional velocity alone)."""

    scale: float  # guidance scale w: v_uncond + w·(v_cond - v_uncond)

    @property
    def identity(self) -> bool:
        """True when the guided velocity is v_cond, so the unconditional half need not run."""
        return self.scale == 1

    def scales(self, v_cond: torch.Tensor, v_uncond: torch.Tensor) -> torch.Tensor:
        """(B,) the scale applied to each sample: ``scale`` for all."""
        return torch.full((v_cond.shape[0],), float(self.scale), device=v_cond.device)

    def __call__(self, v_cond: torch.Tensor, v_uncond: torch.Tensor) -> torch.Tensor:
        return guided(v_cond, v_uncond, self.scale)


# Floor of ||v_uncond|| in the ratio: a zero unconditional velocity gives a huge ratio
# (guidance off) when the two predictions differ, and ratio 0 (full guidance) when they agree.
RATIO_EPS = 1e-12


@dataclass(frozen=True)
class RatioAwareGuidance:
    """RAAG (Zhu et al., "RAAG: Ratio Aware Adaptive Guidance", arXiv:2508.03442): classifier-free
    guidance whose scale shrinks where the conditional prediction departs strongly from the
    unconditional one, which the paper finds happens in the first (noisiest) steps.

    At each velocity evaluation, for each sample::

        ratio = ||v_cond - v_uncond|| / ||v_uncond||        (L2 norms over all of a sample's elements)
        w     = 1 + (w_max - 1)·exp(-alpha·ratio)
        v     = v_uncond + w·(v_cond - v_uncond)

    The paper describes the schedule as a closed-form exponential decay of the scale in the
    ratio of conditional to unconditional predictions, with parameters w_max and alpha; the
    formula above is the one of the authors' released code (github.com/xiaomomy/
    RAAG-Ratio-Aware-Adaptive-Guidance, whose SD3.5 example uses w_max 18, alpha 12), which
    works in the same convention as flowmill (SD3: v = noise - x0). Our reading: the ratio is
    taken per sample, where the released code takes one norm over the whole batch (which would
    tie a sample's guidance to the other prompts beside it), and with unsquared norms as there.

    alpha = 0 is constant CFG at scale w_max; w_max = 1 is no guidance at all.
    """

    w_max: float  # the scale where the ratio is small (the paper's w_max); >= 1
    alpha: float  # decay rate of the scale with the ratio (the paper's alpha); >= 0, 0: constant CFG at w_max

    def __post_init__(self):
        if not (math.isfinite(self.w_max) and self.w_max >= 1):
            raise ValueError(f"RAAG's w_max must be a finite number >= 1, got {self.w_max}")
        if not (math.isfinite(self.alpha) and self.alpha >= 0):
            raise ValueError(f"RAAG's alpha must be a finite number >= 0, got {self.alpha}")

    @property
    def identity(self) -> bool:
        """True when the guided velocity is v_cond whatever the ratio (w_max 1)."""
        return self.w_max == 1

    def ratio(self, v_cond: torch.Tensor, v_uncond: torch.Tensor) -> torch.Tensor:
        """(B,) float32: ||v_cond - v_uncond|| / ||v_uncond|| of each sample."""
        delta = (v_cond.float() - v_uncond.float()).flatten(1).norm(dim=1)
        return delta / v_uncond.float().flatten(1).norm(dim=1).clamp_min(RATIO_EPS)

    def scales(self, v_cond: torch.Tensor, v_uncond: torch.Tensor) -> torch.Tensor:
        """(B,) float32: the scale w of each sample, in [1, w_max]."""
        return 1 + (self.w_max - 1) * torch.exp(-self.alpha * self.ratio(v_cond, v_uncond))

    def __call__(self, v_cond: torch.Tensor, v_uncond: torch.Tensor) -> torch.Tensor:
        return guided(v_cond, v_uncond, per_sample(self.scales(v_cond, v_uncond), v_cond))


GUIDANCES = ("cfg", "raag")


def build_guidance(name: str, scale: float, alpha: float) -> Guidance:
    """The guidance called ``name``: ``cfg`` (constant ``scale``) or ``raag`` (``scale`` is its
    w_max, the scale where the ratio is small). ValueError for another name or RAAG values out of range."""
    if name == "cfg":
        return ConstantGuidance(scale)
    if name == "raag":
        return RatioAwareGuidance(w_max=scale, alpha=alpha)
    raise ValueError(f"unknown guidance {name!r}; choose one of: {', '.join(GUIDANCES)}")


def cfg_velocity(model, txt: torch.Tensor, vec: torch.Tensor, null_txt: torch.Tensor, null_vec: torch.Tensor,
                 guidance: Guidance | float) -> Velocity:
    """A guided velocity function over ``model(x, t, txt, vec)``.

    txt (B, L, D) and vec (B, P) are the prompts; null_txt (1 or B, L, D) and null_vec
    (1 or B, P) the empty prompt; ``guidance`` a ``Guidance``, or a number for constant CFG.
    Conditional and unconditional halves run as one batch of 2B; when guidance is the
    identity (scale 1) only the conditional half runs.
    """
    if isinstance(guidance, (int, float)):
        guidance = ConstantGuidance(float(guidance))
    if guidance.identity:
        return lambda x, t: model(x, t, txt, vec)
    batch = txt.shape[0]
    if null_txt.shape[1:] != txt.shape[1:] or null_vec.shape[1:] != vec.shape[1:]:
        raise ValueError(f"the null prompt (txt {tuple(null_txt.shape)}, vec {tuple(null_vec.shape)}) must match "
                         f"the prompts (txt {tuple(txt.shape)}, vec {tuple(vec.shape)}) except in batch")
    both_txt = torch.cat([txt, null_txt.expand(batch, *txt.shape[1:])])  # (2B, L, D)
    both_vec = torch.cat([vec, null_vec.expand(batch, *vec.shape[1:])])  # (2B, P)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_cond, v_uncond = model(torch.cat([x, x]), torch.cat([t, t]), both_txt, both_vec).chunk(2)
        return guidance(v_cond, v_uncond)

    return velocity
