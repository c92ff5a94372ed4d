"""Flow language model (FLM) and its flow-map student (FMLM), after Lee et al. 2026,
"One-step Language Modeling via Continuous Denoising" (code: github.com/david3684/flm).

Text is a sequence of one-hot vectors; a flow moves Gaussian noise to them and the network
predicts the clean token distribution from the noisy vectors.

Flow convention (all of flowmill): t = 0 is data, t = 1 is noise,
``x_t = (1 - t)·onehot(tokens) + t·noise`` with noise ~ N(0, I) in R^V, velocity
``v = noise - x0``. The paper runs the other way (noise at 0, data at 1); its times are
mapped by ``paper_time_to_flowmill`` and nowhere else.

Time reparameterisation (paper ``utils.compute_alpha_exact``): the network is not conditioned
on t but on the *discrete clock* ``tau = discrete_time(t, V)``, the corruption level of the
uniform-state discrete diffusion that ``argmax(x_t)`` follows:
``P(argmax x_t != token) = (1 - 1/V)·tau``. For a large vocabulary all the change happens in a
narrow band of t (V = 50257: tau goes from 0.1 to 0.9 while t goes from 0.15 to 0.26), so training
times, sampling grids and the time embedding are uniform in tau, not in t.

Shapes: B batch, L sequence length, V vocabulary, D width, C conditioning width.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from flowmill.models.layers import DiTBlock, MLPEmbedder, Modulation, timestep_embedding

GAUSS_HERMITE_NODES = 100  # quadrature nodes for the clock integral (the paper's n_gh)
CLOCK_TABLE_POINTS = 2**14 + 1  # t grid on which the clock is tabulated for its inverse (tau error < 1e-6 up to V = 256k)


@dataclass
class FlowLMConfig:
    """Sizes of a flow LM; defaults are the paper's "small" model on OpenWebText (GPT-2 vocabulary)."""

    vocab_size: int = 50257  # V, token ids are in [0, V)
    seq_len: int = 1024  # L, tokens per sequence (the longest the model takes)
    dim: int = 768  # D, transformer width
    depth: int = 12  # number of DiT blocks
    num_heads: int = 12  # attention heads per block (head width D / heads)
    mlp_ratio: float = 4.0  # feed-forward hidden width as a multiple of D
    cond_dim: int = 128  # C, width of the time embedding that drives adaLN (paper model.cond_dim)
    time_freq_dim: int = 256  # sinusoidal features of a time before its MLP (paper frequency_embedding_size)
    qk_norm: bool = True  # RMSNorm on queries and keys (the paper's DiT soft-caps the logits instead: attn_softcap)
    flow_map: bool = False  # take a second (end) time s: the FMLM student / corrector (paper algo.double_temb)
    learned_loss_weight: bool = False  # carry a per-time loss weight w(t): loss -> exp(-w)·loss + w (paper learnable_loss_weighting)
    rotary: bool = False  # rotary position embedding in attention (the paper's DiT); false: learned absolute positions, as runs before it
    dropout: float = 0.1  # dropout probability on each block's attention and MLP outputs while training (the paper's 0.1)
    attn_softcap: float = 0.0  # > 0: attention logits soft-capped as cap·tanh(logit/cap) (the paper's DiT: 50, without QK-norm); 0: off

    def __post_init__(self) -> None:
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {self.vocab_size}")
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.attn_softcap < 0.0:
            raise ValueError(f"attn_softcap must be >= 0 (0: off), got {self.attn_softcap}")


FLOW_LM_SIZES: dict[str, FlowLMConfig] = {
    "tiny": FlowLMConfig(dim=64, depth=2, num_heads=4, cond_dim=32, time_freq_dim=64),  # CPU tests and demos
    "paper-tiny": FlowLMConfig(dim=256, depth=8, num_heads=8),  # the paper's "tiny"
    "small": FlowLMConfig(),
    "medium": FlowLMConfig(dim=1024, depth=24, num_heads=16),
}


def flow_lm_config(size: str, **overrides) -> FlowLMConfig:
    """The named size from ``FLOW_LM_SIZES`` with fields replaced by ``overrides`` (e.g. vocab_size=8)."""
    if size not in FLOW_LM_SIZES:
        raise ValueError(f"unknown flow LM size '{size}'; choose one of: {', '.join(FLOW_LM_SIZES)}")
    return replace(FLOW_LM_SIZES[size], **overrides)


def paper_time_to_flowmill(time: torch.Tensor) -> torch.Tensor:
    """Map a time of the paper (0 = noise, 1 = data) to flowmill's (0 = data, 1 = noise).

    The map is its own inverse, so it also takes flowmill times back to the paper's.
    The paper's interpolation ``(1 - gamma)·noise + gamma·x0`` is flowmill's x_t at
    ``t = paper_time_to_flowmill(gamma)``; its clock alpha is ``tau = paper_time_to_flowmill(alpha)``.
    """
    return 1.0 - time


@functools.lru_cache(maxsize=None)
def _gauss_hermite(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes z and weights w with sum_i w_i f(z_i) ≈ E[f(Z)], Z ~ N(0, 1), in float64."""
    nodes, weights = np.polynomial.hermite.hermgauss(GAUSS_HERMITE_NODES)
    z = torch.tensor(np.sqrt(2.0) * nodes, dtype=torch.float64, device=device)
    w = torch.tensor(weights / np.sqrt(np.pi), dtype=torch.float64, device=device)
    return z, w


def discrete_time(t: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Discrete clock tau(t) of flowmill times t (any shape), same shape and dtype, in [0, 1].

    In the paper's direction, with gamma the weight of the one-hot and
    m = gamma / (1 - gamma), the correct token wins the argmax with probability
    q = E_z[Phi(z + m)^(V-1)] and the clock is alpha = V/(V-1)·(q - 1/V);
    tau = 1 - alpha. tau(0) = 0 (clean) and tau(1) = 1 (pure noise); tau increases with t.
    """
    z, w = _gauss_hermite(t.device)
    gamma = paper_time_to_flowmill(t.double())
    margin = gamma / (1.0 - gamma).clamp_min(1e-12)  # m; huge but finite at gamma = 1
    log_cdf = torch.special.log_ndtr(z + margin[..., None])  # (..., nodes)
    correct = (w * torch.exp((vocab_size - 1) * log_cdf)).sum(-1)  # q
    alpha = (vocab_size / (vocab_size - 1) * (correct - 1.0 / vocab_size)).clamp(0.0, 1.0)
    return paper_time_to_flowmill(alpha).to(t.dtype)


@functools.lru_cache(maxsize=None)
def _clock_table(vocab_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, tau) float64 on an even t grid; tau made non-decreasing (quadrature noise) for searching."""
    t = torch.linspace(0.0, 1.0, CLOCK_TABLE_POINTS, dtype=torch.float64, device=device)
    return t, torch.cummax(discrete_time(t, vocab_size), dim=0).values


def continuous_time(tau: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Inverse of ``discrete_time``: flowmill times t (same shape and dtype as tau) with tau(t) ≈ tau.

    Linear interpolation in a cached table of the clock (one table per vocabulary and device;
    the paper inverts a spline the same way); monotone in tau. The clock is flat near both ends,
    so the endpoints are pinned: tau = 0 is t = 0 and tau = 1 is t = 1 exactly.
    """
    grid, table = _clock_table(vocab_size, tau.device)
    target = tau.double()
    upper = torch.searchsorted(table, target.contiguous()).clamp(1, CLOCK_TABLE_POINTS - 1)
    low, high = table[upper - 1], table[upper]
    share = ((target - low) / (high - low).clamp_min(1e-300)).clamp(0.0, 1.0)
    t = grid[upper - 1] + share * (grid[upper] - grid[upper - 1])
    t = torch.where(target <= 0.0, torch.zeros_like(t), t)
    t = torch.where(target >= 1.0, torch.ones_like(t), t)
    return t.to(tau.dtype)


class TimeEmbedder(nn.Module):
    """Clock of a (B,) time → (B, C): sinusoidal features of tau in [0, 1] (unscaled, as the paper) and an MLP."""

    def __init__(self, vocab_size: int, freq_dim: int, cond_dim: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.freq_dim = freq_dim
        self.mlp = MLPEmbedder(freq_dim, cond_dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = timestep_embedding(discrete_time(t, self.vocab_size), self.freq_dim)
        return self.mlp(features.to(self.mlp.linear_1.weight.dtype))


class FlowLMEmbed(nn.Module):
    """Pipeline stage 0: ``(x_t, t)`` or ``(x_t, t, s)`` → ``(h, cond)``, h (B, L, D), cond (B, C)."""

    def __init__(self, config: FlowLMConfig):
        super().__init__()
        self.flow_map = config.flow_map
        self.input_proj = nn.Linear(config.vocab_size, config.dim, bias=False)  # x_t @ E, the paper's vocab_embed
        self.seq_len = config.seq_len
        # Learned absolute positions, unless the blocks rotate queries and keys by position.
        self.pos_embed = None if config.rotary else nn.Parameter(torch.randn(1, config.seq_len, config.dim) * 0.02)
        self.time_embed = TimeEmbedder(config.vocab_size, config.time_freq_dim, config.cond_dim)
        self.end_time_embed = None
        if config.flow_map:
            self.end_time_embed = TimeEmbedder(config.vocab_size, config.time_freq_dim, config.cond_dim)
            zero_end_time_embed(self)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        if len(inputs) != (3 if self.flow_map else 2):
            expected = "(x_t, t, s)" if self.flow_map else "(x_t, t)"
            raise ValueError(f"flow LM with flow_map={self.flow_map} takes {expected}, got {len(inputs)} tensors")
        x_t, t = inputs[0], inputs[1]
        length = x_t.shape[1]
        if length > self.seq_len:
            raise ValueError(f"sequence of {length} tokens is longer than seq_len {self.seq_len}")
        h = self.input_proj(x_t.to(self.input_proj.weight.dtype))  # (B, L, D)
        if self.pos_embed is not None:
            h = h + self.pos_embed[:, :length]
        cond = self.time_embed(t)  # (B, C)
        if self.flow_map:
            cond = cond + self.end_time_embed(inputs[2])
        return h, cond


def zero_end_time_embed(embed: FlowLMEmbed) -> None:
    """Zero the last layer of the end-time embedder, so a fresh flow map starts as its teacher (paper)."""
    nn.init.zeros_(embed.end_time_embed.mlp.linear_2.weight)
    nn.init.zeros_(embed.end_time_embed.mlp.linear_2.bias)


def dit_block(config: FlowLMConfig) -> DiTBlock:
    """One transformer block of a flow LM (or of a masked-diffusion LM, which shares the backbone)."""
    return DiTBlock(config.dim, config.num_heads, config.cond_dim, config.mlp_ratio, config.qk_norm, rotary=config.rotary,
                    dropout=config.dropout, attn_softcap=config.attn_softcap)


class FlowLMBlockStage(nn.Module):
    """Pipeline stage for one block: ``(h, cond)`` → ``(h, cond)``."""

    def __init__(self, block: DiTBlock):
        super().__init__()
        self.block = block

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h, cond = inputs
        return self.block(h, cond), cond


class FlowLMHead(nn.Module):
    """Last pipeline stage: ``(h, cond)`` → (B, L, V) outputs; adaLN final norm, zero-initialised projection."""

    def __init__(self, config: FlowLMConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.dim, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(config.cond_dim, 2 * config.dim))
        self.proj = nn.Linear(config.dim, config.vocab_size)
        self.reset_to_zero()

    def reset_to_zero(self) -> None:
        """Zero every linear layer: the output is 0 (uniform logits) until trained."""
        for layer in (self.modulation[1], self.proj):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        h, cond = inputs
        shift, scale = self.modulation(cond).chunk(2, dim=-1)
        return self.proj(Modulation(shift, scale).apply(self.norm(h)))


class LearnedLossWeight(nn.Module):
    """w(t) of (B,) times → (B,); the weighted loss is exp(-w)·loss + w (paper LearnableLossWeighting).

    The paper's module embeds only the start time (its end-time branch is switched off), so does this one.
    The last layer starts at zero: w = 0, weight 1.
    """

    def __init__(self, config: FlowLMConfig, hidden_dim: int = 128):
        super().__init__()
        self.time_embed = TimeEmbedder(config.vocab_size, config.time_freq_dim, config.cond_dim)
        self.mlp = nn.Sequential(nn.Linear(config.cond_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, 1))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.time_embed(t)).squeeze(-1)


class FlowLM(nn.Module):
    """Bidirectional DiT over noisy one-hot sequences.

    ``forward(x_t, t)`` with x_t (B, L, V) and t (B,) returns logits (B, L, V) of the clean
    tokens. A flow-map model (``config.flow_map``) is called ``forward(x_t, t, s)`` with the end
    time s (B,), s <= t; what its output means is set by the objective (train/flm_objective.py).
    """

    def __init__(self, config: FlowLMConfig):
        super().__init__()
        self.config = config
        # Plain attributes the objectives read; they pass through a DeepSpeed engine, whose own
        # ``config`` hides the model's.
        self.vocab_size = config.vocab_size
        self.seq_len = config.seq_len
        self.embed = FlowLMEmbed(config)
        self.blocks = nn.ModuleList(
            dit_block(config) for _ in range(config.depth)
        )
        self.head = FlowLMHead(config)
        self.loss_weight = LearnedLossWeight(config) if config.learned_loss_weight else None

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
        h, cond = self.embed((x_t, t) if s is None else (x_t, t, s))
        for block in self.blocks:
            h = block(h, cond)
        return self.head((h, cond))

    def pipeline_layers(self) -> list[nn.Module]:
        """Embed, one stage per block, head; feeding each the previous output equals ``forward``.

        The first takes ``(x_t, t)`` (or ``(x_t, t, s)``), the last returns the (B, L, V) tensor.
        The stages share this model's parameters. ``loss_weight`` is not a stage.
        """
        return [self.embed, *(FlowLMBlockStage(block) for block in self.blocks), self.head]

    def init_from_teacher(self, teacher: FlowLM, zero_head: bool) -> None:
        """Copy a trained FLM's weights into this flow-map model (paper ``_copy_teacher_weights_to_student``).

        Only the end-time embedder and the loss weight may be missing from the teacher; the
        end-time embedder's last layer is zeroed, so this model starts as the teacher.
        ``zero_head`` also zeroes the output head (the paper's first-stage corrector starts at 0).
        """
        if not self.config.flow_map:
            raise ValueError("init_from_teacher needs a flow_map=True model (the student); this one has flow_map=False")
        result = self.load_state_dict(teacher.state_dict(), strict=False)
        allowed = ("embed.end_time_embed.", "loss_weight.")
        stray = [key for key in result.missing_keys if not key.startswith(allowed)]
        if stray or result.unexpected_keys:
            raise ValueError(
                f"teacher does not match the student: missing {stray}, unexpected {result.unexpected_keys}"
            )
        zero_end_time_embed(self.embed)
        if zero_head:
            self.head.reset_to_zero()
