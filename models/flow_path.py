"""Rectified-flow path and the training-time distributions over t.

Time convention, everywhere in flowmill: t = 0 is data, t = 1 is noise,

    x_t = (1 - t)·x0 + t·noise,        velocity v = dx_t/dt = noise - x0,

as in SD3 and diffusers' flow-matching schedulers. Timestep samplers follow "Scaling
Rectified Flow Transformers for High-Resolution Image Synthesis" (Esser et al., 2024),
section 3.1; ``shift_time`` is its resolution-dependent shift (section 5.3.2).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch


@dataclass
class PathSample:
    """A point on the path and what the model should predict there."""

    x_t: torch.Tensor  # (B, ...) the noised input
    target: torch.Tensor  # (B, ...) the velocity noise - x0


class FlowPath:
    """The straight path between data and noise (rectified flow)."""

    def sample(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> PathSample:
        """x0 and noise (B, ...), t (B,) → x_t and the target velocity, both (B, ...)."""
        if x0.shape != noise.shape:
            raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} differ in shape")
        if t.shape != x0.shape[:1]:
            raise ValueError(f"t must be ({x0.shape[0]},) for a batch of {x0.shape[0]}, got {tuple(t.shape)}")
        # Mixed in at least float32: a bf16 t would put x_t at a different time than the model is told.
        dtype = torch.promote_types(x0.dtype, torch.float32)
        t = t.to(dtype).view(-1, *([1] * (x0.dim() - 1)))
        x_t = torch.lerp(x0.to(dtype), noise.to(dtype), t).to(x0.dtype)
        return PathSample(x_t=x_t, target=noise - x0)


def _draw(draw, n: int, generator: torch.Generator | None, device) -> torch.Tensor:
    # Drawn where the generator lives, then moved: the same seed gives the same times on any device.
    source = generator.device if generator is not None else device
    return draw(n, generator=generator, device=source).to(device)


@dataclass
class UniformTimesteps:
    """t ~ U(0, 1)."""

    def sample(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """(n,) times in [0, 1)."""
        return _draw(torch.rand, n, generator, device)


@dataclass
class LogitNormalTimesteps:
    """t = sigmoid(mean + std·ε), ε ~ N(0, 1): SD3's lognorm(m, s); lognorm(0, 1) was its best."""

    mean: float = 0.0  # location of the normal before the sigmoid (negative favours data, t near 0)
    std: float = 1.0  # spread of the normal before the sigmoid

    def __post_init__(self):
        if not self.std > 0:
            raise ValueError(f"logit_normal std must be positive, got {self.std}")

    def sample(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """(n,) times in (0, 1)."""
        return torch.sigmoid(self.mean + self.std * _draw(torch.randn, n, generator, device))


@dataclass
class ModeTimesteps:
    """SD3's mode sampling with heavy tails: t = 1 - u - scale·(cos²(πu/2) - 1 + u), u ~ U(0, 1).

    scale = 0 is uniform; positive scales favour the middle of the path. The map is
    monotone, hence a density, only for scale in [-1, 2/(π - 2)].
    """

    scale: float = 1.29  # s of the paper; mode(1.29) was among its best

    def __post_init__(self):
        upper = 2 / (math.pi - 2)
        if not -1 <= self.scale <= upper:
            raise ValueError(f"mode scale must be in [-1, {upper:.4f}], got {self.scale}")

    def sample(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """(n,) times in [0, 1]."""
        u = _draw(torch.rand, n, generator, device)
        t = 1 - u - self.scale * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)
        return t.clamp(0, 1)  # rounding can step a hair outside near u = 1


TIMESTEP_SAMPLERS = {"logit_normal": LogitNormalTimesteps, "uniform": UniformTimesteps, "mode": ModeTimesteps}


def build_timestep_sampler(name: str, **params):
    """The timestep distribution called ``name`` with its parameters, e.g.
    ``build_timestep_sampler("logit_normal", mean=0.0, std=1.0)``."""
    if name not in TIMESTEP_SAMPLERS:
        raise ValueError(f"unknown timestep sampler {name!r}; choose one of: {', '.join(TIMESTEP_SAMPLERS)}")
    sampler_class = TIMESTEP_SAMPLERS[name]
    accepted = [field.name for field in dataclasses.fields(sampler_class)]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"timestep sampler {name!r} takes {accepted or 'no parameters'}, not {unknown}")
    return sampler_class(**params)


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's resolution shift t' = shift·t / (1 + (shift - 1)·t), same shape as t.

    shift > 1 moves times towards noise (t = 1), as larger images need; shift = 1 is the
    identity. SD3 uses shift = sqrt(m/n) for m pixels relative to a base of n.
    """
    if not shift > 0:
        raise ValueError(f"time shift must be positive, got {shift}")
    if shift == 1:
        return t
    return shift * t / (1 + (shift - 1) * t)
