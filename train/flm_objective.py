"""Objectives and samplers of the flow language model (FLM) and its flow-map distillation (FMLM).

Plain PyTorch; after github.com/david3684/flm (``algo.py``: ``FLM``, ``FLM_distill``,
``FLM_distill_double``), rewritten in flowmill's convention: t = 0 is data, t = 1 is noise,
``x_t = (1 - t)·x0 + t·noise`` with x0 the one-hot tokens (B, L, V), ``v = noise - x0``.
Sampling integrates from t = 1 to t = 0. Training times and sampling grids are uniform in
the discrete clock tau (see flowmill.models.flow_lm) and converted to t with ``continuous_time``.

The three models:

* FLM (teacher): ``model(x_t, t)`` → logits; p = softmax(logits) estimates E[x0 | x_t] and
  implies the velocity ``v = (x_t - p) / t``. Trained with cross-entropy on the clean tokens.
* Corrector (FMLM stage 1): ``corrector(x_t, t, s)`` → g (B, L, V), a second-order term of the
  flow map ``X(x_t; t→s) = x_t + (s - t)·v_teacher(x_t, t) + ½(s - t)²·g``, trained so that one
  jump t→s matches two jumps t→u→s (u the clock midpoint) built from the teacher and itself.
* Student (FMLM stage 2, the final one-network model): ``student(x_t, t, s)`` → logits; its map
  ``X(x_t; t→s) = x_t + (s - t)·(x_t - p)/t`` is regressed onto the corrected map of stage 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from flowmill.models.flow_lm import continuous_time
from flowmill.train.evaluation import item_normal

# Where a function takes ``Noise``: one generator for the whole batch, or one per row (an evaluation's
# item streams, so a row's noise does not depend on the rows beside it).
Noise = torch.Generator | Sequence[torch.Generator]

VELOCITY_EPS = 1e-5  # added to t in v = (x_t - p) / t so the velocity stays finite at t = 0 (paper: 1 - gamma + 1e-5)
CORRECTOR_BOUNDARY_PROB = 1 / 64  # stage 1: share of jumps that are the whole noise→data path (paper boundary_prob=64)
STUDENT_BOUNDARY_PROB = 1 / 128  # stage 2: the same for the student (paper boundary_prob=128)
CORRECTOR_MIN_JUMP = 1e-6  # stage 1: shortest jump, in clock units (paper clamp(min=1e-6))
STUDENT_MIN_JUMP = 1e-5  # stage 2: shortest jump, in clock units (paper clamp(min=1e-5))


def _uniform(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """U(0, 1) float64 draws from ``generator`` (on its own device), moved to ``device``."""
    return torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float64).to(device)


def _normal(shape: tuple[int, ...], generator: Noise, device: torch.device) -> torch.Tensor:
    """N(0, 1) float32 draws from ``generator`` (on its own device; row by row from a sequence of
    one generator per row), moved to ``device``."""
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, device=generator.device).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for {shape[0]} rows")
    return item_normal(generator, shape[1:]).to(device)


def _col(t: torch.Tensor) -> torch.Tensor:
    """(B,) → (B, 1, 1) float32, to scale (B, L, V) tensors."""
    return t.float()[:, None, None]


def stratified_clock(batch: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """(B,) float64 clock values, one uniform draw in each of B equal strata, shuffled.

    The paper's "antithetic" sampling: lower-variance batches than i.i.d. uniform times.
    """
    strata = (torch.arange(batch, dtype=torch.float64, device=device) + _uniform((batch,), generator, device)) / batch
    order = torch.randperm(batch, generator=generator, device=generator.device).to(device)
    return strata[order]


def corrupt(tokens: torch.Tensor, t: torch.Tensor, vocab_size: int, generator: Noise) -> tuple[torch.Tensor, torch.Tensor]:
    """x_t (B, L, V) float32 and the one-hot x0 (B, L, V) of tokens (B, L) at times t (B,)."""
    x0 = F.one_hot(tokens, vocab_size).float()
    noise = _normal(tuple(x0.shape), generator, tokens.device)
    return (1 - _col(t)) * x0 + _col(t) * noise, x0


def teacher_flow_states(teacher: nn.Module, noise: torch.Tensor, clock: torch.Tensor, steps: int) -> torch.Tensor:
    """States x_t (B, L, V) on the teacher's own flow at clock values ``clock`` (B,) float64: ``steps`` Euler
    steps of its implied velocity from ``noise`` (B, L, V) at t = 1, each row on its own grid evenly spaced
    in the clock from 1 to its value (the data-free distillation's states; the image flow maps' are
    ``flowmap_objective.flow_states``, evenly spaced in t)."""
    x = noise
    vocab_size = noise.shape[-1]
    for index in range(steps):
        start = continuous_time(1 - (1 - clock) * index / steps, vocab_size).float()
        end = continuous_time(1 - (1 - clock) * (index + 1) / steps, vocab_size).float()
        x = x + _col(end - start) * implied_velocity(teacher(x, start), x, start)
    return x


def start_states(teacher: nn.Module, tokens: torch.Tensor, clock: torch.Tensor, t: torch.Tensor, generator: Noise,
                 flow_steps: int) -> torch.Tensor:
    """x_t (B, L, V) where a distillation jump starts: the tokens (B, L) noised to times t (B,) or, with
    ``flow_steps`` > 0 (data-free), ``teacher_flow_states`` at their clock values ``clock`` (B,) from fresh
    noise, of which ``tokens`` gives only the shape."""
    if flow_steps <= 0:
        return corrupt(tokens, t, teacher.vocab_size, generator)[0]
    noise = _normal((*tokens.shape, teacher.vocab_size), generator, tokens.device)
    with torch.no_grad():
        return teacher_flow_states(teacher, noise, clock, flow_steps)


def implied_velocity(logits: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Velocity dx/dt (B, L, V) implied by predicted clean logits (B, L, V) at x_t (B, L, V), t (B,).

    With p = softmax(logits) ≈ E[x0 | x_t]: noise = (x_t - (1 - t)·p) / t, so v = noise - p = (x_t - p) / t.
    The paper's (p - x) / (1 - gamma) is the same field in its reversed time.
    """
    probs = logits.float().softmax(dim=-1)
    return (x_t - probs) / (_col(t) + VELOCITY_EPS)


def clock_grid(steps: int, vocab_size: int, device: torch.device | None = None) -> torch.Tensor:
    """(steps + 1,) float64 times from t = 1 (noise) to t = 0 (data), evenly spaced in the clock."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    tau = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64, device=device)
    return continuous_time(tau, vocab_size)


def _weighted(model: nn.Module, per_token: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Mean of (B, L) losses, under the model's learned weight exp(-w(t))·loss + w(t) if it has one."""
    if model.loss_weight is None:
        return per_token.mean(), {}
    weight = model.loss_weight(t.float()).float()[:, None]  # (B, 1)
    loss = (torch.exp(-weight) * per_token + weight).mean()
    return loss, {"loss_weight": weight.detach().mean()}


def flm_inputs(tokens: torch.Tensor, vocab_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The FLM's training inputs for tokens (B, L): x_t (B, L, V) at times t (B,) uniform in the clock (stratified)."""
    t = continuous_time(stratified_clock(tokens.shape[0], generator, tokens.device), vocab_size).float()
    x_t, _ = corrupt(tokens, t, vocab_size, generator)
    return x_t, t


def flm_loss(model: nn.Module, tokens: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """Scalar FLM loss of tokens (B, L) and metrics (detached 0-dim tensors).

    x_t from ``flm_inputs`` and cross-entropy of the predicted clean distribution against the
    tokens, averaged over tokens (paper ``FLM.loss``).
    """
    x_t, t = flm_inputs(tokens, model.vocab_size, generator)
    logits = model(x_t, t).float()
    ce = F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")  # (B, L)
    loss, metrics = _weighted(model, ce, t)
    accuracy = (logits.argmax(dim=-1) == tokens).float().mean()
    return loss, {"ce": ce.detach().mean(), "accuracy": accuracy.detach(), **metrics}


@torch.no_grad()
def validation_ce(model: nn.Module, tokens: torch.Tensor, time_grid: torch.Tensor, generator: Noise) -> torch.Tensor:
    """(G,) mean cross-entropy of tokens (B, L) at each time of ``time_grid`` (G,), fresh noise per time.

    ``clock_grid(n, V)[1:-1]`` is a grid whose average estimates the training loss.
    """
    batch, _ = tokens.shape
    vocab_size = model.vocab_size
    losses = []
    for time in time_grid.tolist():
        t = torch.full((batch,), time, device=tokens.device)
        x_t, _ = corrupt(tokens, t, vocab_size, generator)
        losses.append(F.cross_entropy(model(x_t, t).float().transpose(1, 2), tokens))
    return torch.stack(losses)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def sample_flm(model: nn.Module, num_samples: int, steps: int, generator: Noise) -> torch.Tensor:
    """Tokens (N, L) by Euler steps of the FLM's implied velocity from noise (paper ``FLM.generate_samples``).

    The last step jumps to the predicted clean distribution, whose argmax is returned.
    """
    device = _model_device(model)
    times = clock_grid(steps, model.vocab_size, device).float()
    x = _normal((num_samples, model.seq_len, model.vocab_size), generator, device)
    for step in range(steps - 1):
        t = times[step].expand(num_samples)
        x = x + _col(times[step + 1] - t) * implied_velocity(model(x, t), x, t)
    return model(x, times[-2].expand(num_samples)).argmax(dim=-1)


def sample_jumps(batch: int, generator: torch.Generator, device: torch.device, boundary_prob: float, min_jump: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Start and end clock values (B,) float64 of flow-map jumps, start > end.

    Jump length stratified-uniform (at least ``min_jump``), start uniform where the jump fits;
    with probability ``boundary_prob`` the jump is the whole path, noise (1) → data (0).
    """
    length = stratified_clock(batch, generator, device).clamp(min_jump, 1.0)
    start = 1.0 - _uniform((batch,), generator, device) * (1.0 - length)
    whole = _uniform((batch,), generator, device) < boundary_prob
    start = torch.where(whole, torch.ones_like(start), start)
    length = torch.where(whole, torch.ones_like(length), length)
    return start, start - length


def corrected_flow_map(teacher: nn.Module, corrector: nn.Module, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Stage-1 flow map: x_s (B, L, V) = x_t + (s - t)·v_teacher(x_t, t) + ½(s - t)²·g(x_t, t, s)."""
    velocity = implied_velocity(teacher(x_t, t), x_t, t)
    jump = _col(s - t)
    return x_t + jump * velocity + 0.5 * jump**2 * corrector(x_t, t, s).float()


def fmlm_corrector_loss(
    corrector: nn.Module,
    teacher: nn.Module,
    tokens: torch.Tensor,
    generator: torch.Generator,
    boundary_prob: float = CORRECTOR_BOUNDARY_PROB,
    flow_steps: int = 0,
) -> tuple[torch.Tensor, dict]:
    """Stage-1 FMLM loss (paper ``FLM_distill.loss``): one corrected jump t→s against two, t→u→s.

    With v_a the teacher velocity at (x_a, a) and g_ab = corrector(x_a, a, b), the mean velocity
    of a jump a→b is m_ab = v_a + ½(b - a)·g_ab. Target, without gradient: x_u = x_t + (u - t)·m_tu,
    m = ((u - t)·m_tu + (s - u)·m_us) / (s - t), x0_target = x_t - t·m. Prediction, with gradient
    through g_ts only: x0_pred = x_t - t·m_ts. Loss per token: ||x0_target - x0_pred||² summed over
    V, averaged, under the corrector's learned weight w(t) if it has one. Both are the clean-data
    estimates the mean velocities imply, so a zero error makes the map a semigroup. x_t is the noised
    tokens, or with ``flow_steps`` > 0 a state of the teacher's own flow (``start_states``).
    """
    clock_t, clock_s = sample_jumps(tokens.shape[0], generator, tokens.device, boundary_prob, CORRECTOR_MIN_JUMP)
    return corrector_jump_loss(corrector, teacher, tokens, clock_t, clock_s, generator, flow_steps)


def corrector_jump_loss(
    corrector: nn.Module,
    teacher: nn.Module,
    tokens: torch.Tensor,
    clock_t: torch.Tensor,
    clock_s: torch.Tensor,
    generator: Noise,
    flow_steps: int = 0,
) -> tuple[torch.Tensor, dict]:
    """``fmlm_corrector_loss`` of given jumps, clock values ``clock_t`` → ``clock_s`` (B,) float64;
    ``generator`` draws only the noise of x_t."""
    vocab_size = corrector.vocab_size
    times = continuous_time(torch.stack([clock_t, 0.5 * (clock_t + clock_s), clock_s]), vocab_size)  # (3, B) float64
    first_share = (times[1] - times[0]) / (times[2] - times[0])  # (u - t) / (s - t), in float64
    t, u, s = times.float()
    x_t = start_states(teacher, tokens, clock_t, t, generator, flow_steps)
    with torch.no_grad():
        v_t = implied_velocity(teacher(x_t, t), x_t, t)
        mean_tu = v_t + 0.5 * _col(u - t) * corrector(x_t, t, u).float()
        x_u = x_t + _col(u - t) * mean_tu
        v_u = implied_velocity(teacher(x_u, u), x_u, u)
        mean_us = v_u + 0.5 * _col(s - u) * corrector(x_u, u, s).float()
        mean_ts = _col(first_share) * mean_tu + _col(1 - first_share) * mean_us
        target = x_t - _col(t) * mean_ts
    prediction = x_t - _col(t) * (v_t + 0.5 * _col(s - t) * corrector(x_t, t, s).float())
    per_token = (target - prediction).pow(2).sum(dim=-1)  # (B, L)
    loss, metrics = _weighted(corrector, per_token, t)
    return loss, {"distill_error": per_token.detach().mean(), **metrics}


def student_flow_map(student: nn.Module, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Stage-2 flow map: x_s (B, L, V) = x_t + (s - t)·(x_t - p)/t with p = softmax(student(x_t, t, s))."""
    return x_t + _col(s - t) * implied_velocity(student(x_t, t, s), x_t, t)


def fmlm_distill_loss(
    student: nn.Module,
    teacher: nn.Module,
    corrector: nn.Module,
    tokens: torch.Tensor,
    generator: torch.Generator,
    boundary_prob: float = STUDENT_BOUNDARY_PROB,
    flow_steps: int = 0,
) -> tuple[torch.Tensor, dict]:
    """Stage-2 FMLM loss (paper ``FLM_distill_double.loss``): the student's map against the corrected map.

    ||X_student(x_t; t→s) - X_corrected(x_t; t→s)||² summed over V, averaged over tokens; the
    teacher and corrector run without gradient. The paper applies no learned weight here. x_t as in
    ``fmlm_corrector_loss``.
    """
    clock_t, clock_s = sample_jumps(tokens.shape[0], generator, tokens.device, boundary_prob, STUDENT_MIN_JUMP)
    return student_jump_loss(student, teacher, corrector, tokens, clock_t, clock_s, generator, flow_steps)


def student_jump_loss(
    student: nn.Module,
    teacher: nn.Module,
    corrector: nn.Module,
    tokens: torch.Tensor,
    clock_t: torch.Tensor,
    clock_s: torch.Tensor,
    generator: Noise,
    flow_steps: int = 0,
) -> tuple[torch.Tensor, dict]:
    """``fmlm_distill_loss`` of given jumps, clock values ``clock_t`` → ``clock_s`` (B,) float64;
    ``generator`` draws only the noise of x_t."""
    vocab_size = student.vocab_size
    t, s = continuous_time(torch.stack([clock_t, clock_s]), vocab_size).float()
    x_t = start_states(teacher, tokens, clock_t, t, generator, flow_steps)
    with torch.no_grad():
        target = corrected_flow_map(teacher, corrector, x_t, t, s)
    per_token = (target - student_flow_map(student, x_t, t, s)).pow(2).sum(dim=-1)  # (B, L)
    loss = per_token.mean()
    return loss, {"distill_error": loss.detach()}


@torch.no_grad()
def sample_fmlm(student: nn.Module, num_samples: int, steps: int, generator: Noise) -> torch.Tensor:
    """Tokens (N, L) from the stage-2 student in ``steps`` jumps (1, 2, 4, ...), one network call each.

    As the paper, the last jump (to t = 0) takes the predicted clean distribution, whose argmax is returned.
    """
    device = _model_device(student)
    times = clock_grid(steps, student.vocab_size, device).float()
    x = _normal((num_samples, student.seq_len, student.vocab_size), generator, device)
    for step in range(steps - 1):
        t, s = times[step].expand(num_samples), times[step + 1].expand(num_samples)
        x = student_flow_map(student, x, t, s)
    t, s = times[-2].expand(num_samples), times[-1].expand(num_samples)
    return student(x, t, s).argmax(dim=-1)


@torch.no_grad()
def sample_corrected(teacher: nn.Module, corrector: nn.Module, num_samples: int, steps: int, generator: Noise) -> torch.Tensor:
    """Tokens (N, L) from the stage-1 map (teacher + corrector, two calls per jump); argmax of the last x."""
    device = _model_device(teacher)
    times = clock_grid(steps, teacher.vocab_size, device).float()
    x = _normal((num_samples, teacher.seq_len, teacher.vocab_size), generator, device)
    for step in range(steps):
        t, s = times[step].expand(num_samples), times[step + 1].expand(num_samples)
        x = corrected_flow_map(teacher, corrector, x, t, s)
    return x.argmax(dim=-1)
