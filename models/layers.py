"""Building blocks shared by flowmill's models: attention, embeddings, adaLN modulation.

Every block here is plain PyTorch. Shapes use B = batch, L = sequence length,
D = model width, H = heads.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.attention import SDPBackend, sdpa_kernel


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              softcap: float = 0.0) -> torch.Tensor:
    """Multi-head attention over (B, H, L, Dh) tensors; returns (B, L, H·Dh).

    ``softcap`` > 0 bounds the logits q·k/sqrt(Dh) to (-softcap, softcap) by ``softcap·tanh(logit/softcap)``
    before the softmax (Gemma 2's attention-logit soft-capping); the fused kernels have no such
    step, so that path computes the scores itself.
    """
    if softcap > 0.0:
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, L, L)
        scores = softcap * torch.tanh(scores / softcap)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        out = scores.softmax(dim=-1) @ v  # (B, H, L, Dh)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, L, Dh)
    batch, heads, length, head_dim = out.shape
    return out.transpose(1, 2).reshape(batch, length, heads * head_dim)


@functools.lru_cache(maxsize=8)
def rotary_tables(length: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (L, Dh) float32 of rotary position embedding, frequencies 10000^(-2k/Dh), halves repeated."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim)
    angles = torch.arange(length, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]  # (L, Dh/2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, L, Dh) queries or keys by their position (rotary embedding, the half-split form):
    attention scores then depend on the positions' difference only."""
    cos, sin = rotary_tables(x.shape[-2], x.shape[-1], x.device)
    first, second = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat([-second, first], dim=-1) * sin.to(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) times as (B, dim), cosines first.

    Matches diffusers' ``Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)``,
    so callers pass the same scale diffusers does (SD3 feeds 1000·t).
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    angles = t.float()[:, None] * torch.exp(exponent)[None, :]  # (B, half)
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def sincos_axis(positions: torch.Tensor, channels: int) -> torch.Tensor:
    """(len, channels) float64 table ``[sin(p·ω), cos(p·ω)]`` of 1-D positions, ω = 10000^(-k/half)."""
    half = channels // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) / half)
    angles = torch.outer(positions.double(), omega)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_pe_3d(dim: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """Fixed sincos table (T'·H'·W', dim) for space-time patches in (time, row, column) order.

    Each axis gets the same number of channels (``sincos_axis``); channels left over when
    ``dim`` is not a multiple of 6 are zero. A fixed table gives every patch a position as loud
    as its content from the first step, where a learned table starting near zero leaves
    patches of pure noise indistinguishable.
    """
    per_axis = (dim // 6) * 2
    if per_axis == 0:
        raise ValueError(f"a 3D sincos table needs dim >= 6, got {dim}")
    frames, rows, cols = grid
    times, ys, xs = (sincos_axis(torch.arange(size), per_axis) for size in grid)
    table = torch.cat(
        [
            times[:, None, None].expand(frames, rows, cols, per_axis),
            ys[None, :, None].expand(frames, rows, cols, per_axis),
            xs[None, None, :].expand(frames, rows, cols, per_axis),
        ],
        dim=-1,
    ).reshape(frames * rows * cols, 3 * per_axis)
    return F.pad(table, (0, dim - 3 * per_axis)).float()


class MLPEmbedder(nn.Module):
    """Linear → SiLU → Linear, the embedder SD3 uses for timesteps and pooled text."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


@dataclass
class Modulation:
    """One adaLN modulation: ``x * (1 + scale) + shift``, residual branch scaled by ``gate``.

    A named triple instead of a tuple unpacked by position (the classic shift/scale swap).
    Each tensor is (B, D); ``gate`` is None where a modulation has no gate.
    """

    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor | None = None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Modulate (B, L, D) activations."""
        # One pass over the activations instead of a product and then a sum.
        return torch.addcmul(self.shift[:, None, :], x, 1 + self.scale[:, None, :])

    def add_gated(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``x`` plus a (B, L, D) residual branch scaled by the gate, in one pass over the activations."""
        return x + residual if self.gate is None else torch.addcmul(x, self.gate[:, None, :], residual)


# Set inside ``forward_differentiable``: the hand-written autograd Functions below have no forward-mode rule.
_FORWARD_MODE = contextvars.ContextVar("forward_mode", default=False)


@contextlib.contextmanager
def forward_differentiable() -> Iterator[None]:
    """Run the layers here so that forward-mode derivatives (``torch.func.jvp``) pass through them,
    and reverse mode through those: PyTorch's own norm and GELU kernels instead of the hand-written
    CPU forms, and attention by the math backend (the fused CPU and flash kernels have no forward-mode
    rule). Same functions, slower."""
    token = _FORWARD_MODE.set(True)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        _FORWARD_MODE.reset(token)


def _cpu_fp32_training(x: torch.Tensor) -> bool:
    """Whether the hand-written CPU forms below apply: fp32 on the CPU, eager, with gradients, outside
    ``forward_differentiable``. Elsewhere (GPUs, bf16, torch.compile, inference) PyTorch's kernels are the faster ones."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and not _FORWARD_MODE.get())


class _RMSNorm(torch.autograd.Function):
    """RMS norm over the last dim with a weight, in 3 passes forward and 6 backward where
    PyTorch's CPU composite takes about twice as many."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        width = x.shape[-1]
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(width).add_(eps).rsqrt_()
        ctx.save_for_backward(x, weight, rstd)
        return (x * rstd).mul_(weight)

    @staticmethod
    @once_differentiable  # a second derivative raises instead of silently being wrong
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        width = x.shape[-1]
        grad_normed = grad * weight
        # d/dx (x·r) applied to g: r·(g - x·r²·<g, x>/D)
        coef = torch.linalg.vecdot(grad_normed, x, dim=-1).unsqueeze(-1).mul_(rstd.square()).div_(width)
        grad_x = grad_normed.addcmul_(x, coef, value=-1).mul_(rstd)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = torch.mv((grad * x).reshape(-1, width).t(), rstd.reshape(-1))
        return grad_x, grad_weight, None


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` (same parameters and function) with a faster CPU fp32 training path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None or len(self.normalized_shape) != 1 or not _cpu_fp32_training(x):
            return super().forward(x)
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps  # nn.RMSNorm's default
        return _RMSNorm.apply(x, self.weight, eps)


_GELU_C = 2 * math.sqrt(2 / math.pi)  # GELU(tanh) = x·sigmoid(C·(x + A·x³))
_GELU_A = 0.044715


class _GeluTanh(torch.autograd.Function):
    """GELU(tanh) written with a sigmoid, ``x·sigmoid(z)`` with ``z = C·(x + A·x³)``: the same
    function as ``F.gelu(approximate="tanh")`` without its tanh, the costliest step of that
    kernel on the CPU, where a sigmoid is cheaper. The forward also computes the derivative and
    keeps only that (as much memory as ``F.gelu``, which keeps x), so the backward is one product.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        square = x * x
        slope = torch.mul(square, 3 * _GELU_A * _GELU_C).add_(_GELU_C).mul_(x)  # x·z'
        sigmoid = square.mul_(_GELU_A * _GELU_C).add_(_GELU_C).mul_(x).sigmoid_()
        # d/dx x·sigmoid(z) = s·(1 + x·z'·(1 - s)), s = sigmoid(z)
        ctx.save_for_backward(slope.addcmul_(slope, sigmoid, value=-1).add_(1).mul_(sigmoid))
        return sigmoid.mul_(x)  # the output, in the sigmoid's buffer: one allocation fewer

    @staticmethod
    @once_differentiable  # a second derivative raises instead of silently being wrong
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (derivative,) = ctx.saved_tensors
        return grad * derivative


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (``_GeluTanh`` in CPU fp32 training, else PyTorch's kernel)."""
    if not _cpu_fp32_training(x):
        return F.gelu(x, approximate="tanh")
    return _GeluTanh.apply(x)


class FeedForward(nn.Module):
    """Transformer MLP: Linear → GELU(tanh) → Linear."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(gelu_tanh(self.fc1(x)))


class DiTBlock(nn.Module):
    """Single-stream transformer block with adaLN-Zero conditioning (DiT).

    ``forward(x, cond)`` takes tokens (B, L, D) and a conditioning vector (B, cond_dim)
    and returns (B, L, D). The modulation is zero-initialised, so a fresh block is the
    identity: deep stacks start stable.
    """

    def __init__(self, dim: int, num_heads: int, cond_dim: int, mlp_ratio: float = 4.0, qk_norm: bool = True, rotary: bool = False,
                 dropout: float = 0.0, attn_softcap: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.rotary = rotary  # rotary position embedding on queries and keys (after their norm)
        self.attn_softcap = attn_softcap  # > 0: soft-cap the attention logits at this value (``attention``)
        # On each residual branch's output before its gate, as the DiT of MDLM and FLM; off in eval mode.
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        head_dim = dim // num_heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * dim))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond).chunk(6, dim=-1)
        attn_mod = Modulation(shift1, scale1, gate1)
        mlp_mod = Modulation(shift2, scale2, gate2)
        batch, length, dim = x.shape
        qkv = self.qkv(attn_mod.apply(self.norm1(x)))  # (B, L, 3D)
        q, k, v = qkv.view(batch, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)  # each (B, H, L, Dh)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary:
            q, k = apply_rotary(q), apply_rotary(k)
        x = attn_mod.add_gated(x, self.dropout(self.proj(attention(q, k, v, mask, self.attn_softcap))))
        return mlp_mod.add_gated(x, self.dropout(self.mlp(mlp_mod.apply(self.norm2(x)))))
