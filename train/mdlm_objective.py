"""Objective and sampler of the masked-diffusion language model (MDLM), after Sahoo et al. 2024 and
the FLM paper's baseline (github.com/david3684/flm ``algo.MDLM``, ``trainer_base.AbsorbingState``).

Forward process (flowmill's time: t = 0 is data, t = 1 is noise): each token of x0 is replaced
by the mask id, independently, with probability t (the log-linear schedule, alpha_t = 1 - t,
of the clean share). The model predicts the clean tokens; its SUBS parameterisation gives the
mask probability zero (``flowmill.models.masked_diffusion_lm``) and carries unmasked tokens over
unchanged, so only masked positions can be wrong.

Loss: the continuous-time negative ELBO,
``E_t E_{x_t} [ -alpha'_t / (1 - alpha_t) · Σ_{masked l} -log p(x0_l | x_t) ] / L``,
which for alpha_t = 1 - t weighs the masked cross-entropy by 1/t; averaged over tokens it bounds
the negative log-likelihood in nats per token. t is stratified in [MIN_TIME, 1].

Sampling runs the reverse process in N steps on the grid t_k = 1 - k/N: from t to s < t each
still-masked token is unmasked with probability (t - s)/t and then drawn from the predicted clean
distribution; unmasked tokens never change. The last step (s = 0) unmasks every remaining one, so N
steps are N network calls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flowmill.train.flm_objective import Noise, stratified_clock

MIN_TIME = 1e-3  # shortest training time: bounds the ELBO weight 1/t (the paper's sampling_eps)
ELBO_POINTS = 16  # midpoint-rule times of the validation ELBO's integral over t


def uniform(shape: tuple[int, ...], generator: Noise, device: torch.device) -> torch.Tensor:
    """U(0, 1) float64 draws from ``generator`` (row by row from a sequence of one generator per row), on ``device``."""
    if isinstance(generator, torch.Generator):
        return torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float64).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for {shape[0]} rows")
    rows = [torch.rand(shape[1:], generator=row, dtype=torch.float64) for row in generator]
    return (torch.stack(rows) if rows else torch.empty((0, *shape[1:]), dtype=torch.float64)).to(device)


def mask_tokens(tokens: torch.Tensor, t: torch.Tensor, mask_id: int, generator: Noise) -> torch.Tensor:
    """x_t (B, L) long: tokens (B, L) with each replaced by ``mask_id`` with probability t (B,)."""
    masked = uniform(tuple(tokens.shape), generator, tokens.device) < t.double()[:, None]
    return torch.where(masked, torch.full_like(tokens, mask_id), tokens)


def carry_over_ce(logits: torch.Tensor, tokens_t: torch.Tensor, tokens: torch.Tensor, mask_id: int) -> torch.Tensor:
    """(B, L) cross-entropy of the clean tokens under the SUBS prediction: the model's at masked
    positions, 0 at unmasked ones (carried over, the prediction there is the token itself)."""
    ce = F.cross_entropy(logits.float().transpose(1, 2), tokens, reduction="none")
    return torch.where(tokens_t == mask_id, ce, torch.zeros_like(ce))


def training_times(batch: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """(B,) float32 times, stratified in [MIN_TIME, 1]."""
    return (MIN_TIME + (1.0 - MIN_TIME) * stratified_clock(batch, generator, device)).float()


def mdlm_loss(model: nn.Module, tokens: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """Scalar MDLM loss of tokens (B, L), the negative ELBO in nats per token, and metrics (detached
    0-dim tensors: ``masked_ce`` and ``accuracy`` over the masked positions)."""
    t = training_times(tokens.shape[0], generator, tokens.device)
    tokens_t = mask_tokens(tokens, t, model.mask_id, generator)
    logits = model(tokens_t, t)
    ce = carry_over_ce(logits, tokens_t, tokens, model.mask_id)  # (B, L)
    loss = (ce / t[:, None]).mean()  # weight -alpha'/(1 - alpha) = 1/t
    masked = tokens_t == model.mask_id
    count = masked.sum().clamp_min(1)
    accuracy = ((logits.argmax(dim=-1) == tokens) & masked).sum() / count
    return loss, {"masked_ce": (ce.sum() / count).detach(), "accuracy": accuracy.detach()}


@torch.no_grad()
def validation_ce(model: nn.Module, tokens: torch.Tensor, times: torch.Tensor, generator: Noise) -> torch.Tensor:
    """(G,) mean carry-over cross-entropy per token of tokens (B, L) masked at each time of ``times`` (G,),
    fresh masks per time: at time t a share t of the tokens is masked and scored, the rest cost nothing."""
    batch = tokens.shape[0]
    losses = []
    for time in times.tolist():
        t = torch.full((batch,), time, device=tokens.device)
        tokens_t = mask_tokens(tokens, t, model.mask_id, generator)
        losses.append(carry_over_ce(model(tokens_t, t), tokens_t, tokens, model.mask_id).mean())
    return torch.stack(losses)


def elbo_times(points: int = ELBO_POINTS) -> torch.Tensor:
    """(points,) float32 midpoints of ``points`` equal cells of [0, 1]: the validation ELBO's quadrature."""
    return (torch.arange(points, dtype=torch.float64) + 0.5).div(points).float()


@torch.no_grad()
def validation_elbo(model: nn.Module, tokens: torch.Tensor, generator: Noise, points: int = ELBO_POINTS) -> torch.Tensor:
    """0-dim negative ELBO in nats per token of tokens (B, L): the integral over t of the 1/t-weighted
    ``validation_ce``, by the midpoint rule on ``elbo_times(points)``."""
    times = elbo_times(points).to(tokens.device)
    return (validation_ce(model, tokens, times, generator) / times).mean()


@torch.no_grad()
def sample_mdlm(model: nn.Module, num_samples: int, steps: int, generator: Noise) -> torch.Tensor:
    """Tokens (N, L) in [0, V) by ``steps`` ancestral unmasking steps from all masks, one network call each."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device = next(model.parameters()).device
    times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    x = torch.full((num_samples, model.seq_len), model.mask_id, dtype=torch.long, device=device)
    for step in range(steps):
        t, s = times[step].item(), times[step + 1].item()
        probs = model(x, torch.full((num_samples,), t, device=device)).double().softmax(dim=-1)  # (N, L, V)
        # Two draws per position at every step, used or not: a row's stream does not depend on its masks.
        reveal = uniform(tuple(x.shape), generator, device) < (t - s) / t
        pick = uniform(tuple(x.shape), generator, device)
        drawn = torch.searchsorted(probs.cumsum(dim=-1), pick[..., None], right=True).squeeze(-1).clamp_max(model.vocab_size - 1)
        x = torch.where((x == model.mask_id) & reveal, drawn, x)
    return x
