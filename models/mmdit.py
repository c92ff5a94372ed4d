"""MMDiT, the multimodal diffusion transformer of Stable Diffusion 3.

"Scaling Rectified Flow Transformers for High-Resolution Image Synthesis" (Esser et al.,
2024). For the same weights this is the same function as diffusers'
``SD3Transformer2DModel`` (``flowmill.models.sd3_convert`` maps the weights both ways):

    img (B, C, H, W) ──patch Linear + 2D sincos pe──► image tokens (B, h, w, D)
    txt (B, L, txt_dim) ──Linear────────────────────► text tokens  (B, L, D)
    t (B,), vec (B, vec_dim) ──MLPs, summed, SiLU───► conditioning (B, D)
    [flow map: + MLP of the jump t - s to the end time s, zero at init]
    depth × joint block: separate weights per stream, one attention over [img; txt]
    adaLN final layer + Linear + unpatchify ──────► velocity (B, C, H, W)

Time follows flowmill's convention: t = 0 is data, t = 1 is noise, and the model predicts
v = noise - x0. The sinusoid sees 1000·t, the scale SD3 was trained with.

With ``flow_map=True`` the model also takes the end time s of a jump and returns the average
velocity u(x, t, s) of the flow map X(x; t→s) = x + (s - t)·u (see flowmill.models.flow_map):
one more time embedding, of the jump t - s, added to the conditioning. Its output layer starts at
zero, so a flow map loaded from a trained MMDiT's weights is that MMDiT, u(x, t, s) = v(x, t), and
the diagonal u(x, t, t) is always the velocity. Without it the weights are SD3's, key for key.

Image tokens travel between layers on their patch grid, (B, h, w, D), so every layer of
``pipeline_layers()`` gets and passes plain tensors and the last one can unpatchify
without being told the resolution.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flowmill.models.layers import FeedForward, MLPEmbedder, Modulation, RMSNorm, attention, sincos_axis, timestep_embedding

# SD3 embeds 1000·t with a 256-channel sinusoid.
TIME_SCALE = 1000.0
TIME_CHANNELS = 256
NORM_EPS = 1e-6


@dataclass
class MMDiTConfig:
    """MMDiT hyper-parameters; the defaults are SD3-medium's."""

    in_channels: int = 16  # channels of the input latent image
    out_channels: int = 16  # channels of the predicted velocity
    patch_size: int = 2  # side of a square patch, in latent pixels
    depth: int = 24  # number of joint blocks
    num_heads: int = 24  # attention heads; model width D = num_heads * head_dim
    head_dim: int = 64  # channels per attention head
    txt_dim: int = 4096  # width of the incoming text tokens (diffusers joint_attention_dim)
    vec_dim: int = 2048  # width of the incoming pooled text vector (diffusers pooled_projection_dim)
    sample_size: int = 128  # training latent side in pixels; pe positions are scaled to sample_size // patch_size
    pos_embed_max_size: int = 192  # side of the positional table in patches; larger latents are refused
    qk_norm: bool = False  # RMSNorm on each head's queries and keys (SD3.5; diffusers qk_norm="rms_norm")
    mlp_ratio: float = 4.0  # MLP hidden width as a multiple of D
    flow_map: bool = False  # also take a jump's end time s and return the flow map's average velocity (not SD3's)

    def __post_init__(self):
        for name in ("in_channels", "out_channels", "patch_size", "depth", "num_heads", "head_dim",
                     "txt_dim", "vec_dim", "sample_size", "pos_embed_max_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MMDiTConfig.{name} must be a positive int, got {value!r}")
        if self.dim % 4:
            raise ValueError(f"MMDiTConfig: width num_heads*head_dim = {self.dim} must be divisible by 4 "
                             "for the 2D sincos positional embedding")
        if self.mlp_ratio <= 0 or int(self.dim * self.mlp_ratio) < 1:
            raise ValueError(f"MMDiTConfig.mlp_ratio must be positive, got {self.mlp_ratio!r}")

    @property
    def dim(self) -> int:
        """Model width D."""
        return self.num_heads * self.head_dim


# Named sizes. SD3 scales width with depth: D = 64·depth, heads = depth.
MMDIT_SIZES: dict[str, MMDiTConfig] = {
    "tiny": MMDiTConfig(in_channels=4, out_channels=4, depth=2, num_heads=2, head_dim=16, txt_dim=32,
                        vec_dim=24, sample_size=16, pos_embed_max_size=16),
    "small": MMDiTConfig(depth=12, num_heads=12, head_dim=64),
    "sd3-medium": MMDiTConfig(),
}


def mmdit_config(name: str, **overrides) -> MMDiTConfig:
    """The named size with some fields replaced, e.g. ``mmdit_config("tiny", depth=3)``."""
    if name not in MMDIT_SIZES:
        raise ValueError(f"unknown MMDiT size {name!r}; choose one of: {', '.join(MMDIT_SIZES)}")
    fields = [field.name for field in dataclasses.fields(MMDiTConfig)]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(f"unknown MMDiTConfig field(s) {unknown}; valid fields: {', '.join(fields)}")
    return dataclasses.replace(MMDIT_SIZES[name], **overrides)


def sincos_pe_2d(dim: int, grid_size: int, base_size: int) -> torch.Tensor:
    """Fixed 2D sincos table (grid_size, grid_size, dim) for patch rows × columns.

    Positions are scaled so that ``base_size`` patches (the training resolution) span the
    table's coordinates 0..base_size, as SD3 does. Each entry is
    [sin(col·ω), cos(col·ω), sin(row·ω), cos(row·ω)] with ω = 10000^(-k/(dim/4)).
    """
    pos = torch.arange(grid_size, dtype=torch.float32) / (grid_size / base_size)
    axis = sincos_axis(pos, dim // 2)  # (grid, dim/2)
    rows = axis[:, None, :].expand(grid_size, grid_size, dim // 2)
    cols = axis[None, :, :].expand(grid_size, grid_size, dim // 2)
    return torch.cat([cols, rows], dim=-1).float()


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine weights (adaLN supplies scale and shift)."""
    return F.layer_norm(x, x.shape[-1:], eps=NORM_EPS)


class MMDiTEmbed(nn.Module):
    """Inputs → tokens and conditioning; the first pipeline layer."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        # SD3's stride-p convolution as a Linear over flattened patches; inputs ordered (C, p, q).
        self.patch = nn.Linear(cfg.in_channels * cfg.patch_size ** 2, cfg.dim)
        # Persistent so imported checkpoints keep their own table, which defines their function.
        pe = sincos_pe_2d(cfg.dim, cfg.pos_embed_max_size, cfg.sample_size // cfg.patch_size)
        self.register_buffer("pe", pe)  # (M, M, D)
        self.time = MLPEmbedder(TIME_CHANNELS, cfg.dim)
        self.pooled = MLPEmbedder(cfg.vec_dim, cfg.dim)
        self.txt = nn.Linear(cfg.txt_dim, cfg.dim)
        # Flow maps: embeds the jump length t - s; its last layer starts at zero (MMDiT.reset_parameters).
        self.jump = MLPEmbedder(TIME_CHANNELS, cfg.dim) if cfg.flow_map else None

    def cropped_pe(self, height: int, width: int) -> torch.Tensor:
        """The centre (height, width, D) window of the table, for a grid of patches."""
        max_size = self.pe.shape[0]
        if height > max_size or width > max_size:
            raise ValueError(f"latent of {height}x{width} patches exceeds pos_embed_max_size {max_size}")
        top = (max_size - height) // 2
        left = (max_size - width) // 2
        return self.pe[top:top + height, left:left + width]

    def forward(self, img: torch.Tensor, t: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor,
                s: torch.Tensor | None = None):
        """img (B, C, H, W), t (B,) in [0, 1], txt (B, L, txt_dim), vec (B, vec_dim), and for a
        flow map the end time s (B,) (None: s = t) → (image tokens (B, h, w, D), text tokens
        (B, L, D), conditioning (B, D)).

        The conditioning is returned after its SiLU: every adaLN consumes only that.
        """
        batch, channels, height, width = img.shape
        patch = self.patch_size
        if height % patch or width % patch:
            raise ValueError(f"image {height}x{width} is not divisible by patch_size {patch}")
        rows, cols = height // patch, width // patch
        patches = img.view(batch, channels, rows, patch, cols, patch).permute(0, 2, 4, 1, 3, 5)
        tokens = self.patch(patches.reshape(batch, rows, cols, channels * patch * patch))  # (B, h, w, D)
        tokens = tokens + self.cropped_pe(rows, cols)
        t_freq = timestep_embedding(TIME_SCALE * t, TIME_CHANNELS).to(vec.dtype)  # (B, 256)
        cond = self.time(t_freq) + self.pooled(vec)  # (B, D)
        if self.jump is not None:
            gap = t - s if s is not None else torch.zeros_like(t)
            cond = cond + self.jump(timestep_embedding(TIME_SCALE * gap, TIME_CHANNELS).to(vec.dtype))
        elif s is not None:
            raise ValueError("an end time s was given to an MMDiT that is not a flow map (MMDiTConfig.flow_map=False)")
        return tokens, self.txt(txt), F.silu(cond)


class Stream(nn.Module):
    """One stream's (image or text) weights in a joint block: adaLN-Zero, QKV, output, MLP."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        dim = cfg.dim
        self.num_heads = cfg.num_heads
        self.mod = nn.Linear(dim, 6 * dim)  # shift, scale, gate for attention, then for the MLP
        self.qkv = nn.Linear(dim, 3 * dim)  # rows: q, k, v; each head-major (H, Dh)
        self.q_norm = RMSNorm(cfg.head_dim, eps=NORM_EPS) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, eps=NORM_EPS) if cfg.qk_norm else None
        self.proj = nn.Linear(dim, dim)
        self.mlp = FeedForward(dim, int(dim * cfg.mlp_ratio))

    def modulations(self, cond: torch.Tensor) -> tuple[Modulation, Modulation]:
        """Conditioning (B, D) → (attention, MLP) modulations of (B, D) tensors."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.mod(cond).chunk(6, dim=-1)
        return Modulation(shift1, scale1, gate1), Modulation(shift2, scale2, gate2)

    def qkv_heads(self, x: torch.Tensor, mod: Modulation):
        """Tokens (B, L, D) → q, k, v, each (B, L, H, Dh) (views when there is no qk norm)."""
        batch, length, dim = x.shape
        qkv = self.qkv(mod.apply(layer_norm(x))).view(batch, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.unbind(dim=2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def finish(self, x: torch.Tensor, attn_out: torch.Tensor, attn_mod: Modulation, mlp_mod: Modulation):
        """Gated attention residual, then the gated MLP residual: (B, L, D) → (B, L, D)."""
        x = attn_mod.add_gated(x, self.proj(attn_out))
        return mlp_mod.add_gated(x, self.mlp(mlp_mod.apply(layer_norm(x))))


class ContextStream(nn.Module):
    """The text stream of the last block: it only lends keys and values to the image.

    SD3 (diffusers ``context_pre_only``) also computes text queries there and discards
    their output; they cannot change the velocity, so flowmill does not hold them.
    """

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        dim = cfg.dim
        self.num_heads = cfg.num_heads
        # Scale before shift: the order of SD3's AdaLayerNormContinuous.
        self.mod = nn.Linear(dim, 2 * dim)
        self.kv = nn.Linear(dim, 2 * dim)  # rows: k, v; each head-major (H, Dh)
        self.k_norm = RMSNorm(cfg.head_dim, eps=NORM_EPS) if cfg.qk_norm else None

    def kv_heads(self, x: torch.Tensor, cond: torch.Tensor):
        """Tokens (B, L, D) and conditioning (B, D) → k, v, each (B, L, H, Dh)."""
        scale, shift = self.mod(cond).chunk(2, dim=-1)
        batch, length, dim = x.shape
        kv = self.kv(Modulation(shift, scale).apply(layer_norm(x)))
        k, v = kv.view(batch, length, 2, self.num_heads, dim // self.num_heads).unbind(dim=2)
        if self.k_norm is not None:
            k = self.k_norm(k)
        return k, v


class JointBlock(nn.Module):
    """MMDiT block: two streams with their own weights, one attention over [img; txt].

    ``forward(img, txt, cond)`` takes image tokens (B, h, w, D), text tokens (B, L, D) and
    the conditioning (B, D); returns new (img, txt). In the last block (``last=True``)
    the text stream ends here and the returned txt is None.
    """

    def __init__(self, cfg: MMDiTConfig, last: bool = False):
        super().__init__()
        self.img = Stream(cfg)
        self.txt = ContextStream(cfg) if last else Stream(cfg)
        self.compiled = False  # set by MMDiT.compile_blocks

    def forward(self, img: torch.Tensor, txt: torch.Tensor, cond: torch.Tensor):
        if self.compiled and torch.is_grad_enabled():
            return _compiled_block_forward()(self, img, txt, cond)
        return self.joint_forward(img, txt, cond)

    def joint_forward(self, img: torch.Tensor, txt: torch.Tensor, cond: torch.Tensor):
        """The block's computation (``forward`` may run it compiled)."""
        batch, height, width, dim = img.shape
        x = img.view(batch, height * width, dim)  # (B, N, D)
        img_attn, img_mlp = self.img.modulations(cond)
        q, k, v = self.img.qkv_heads(x, img_attn)  # each (B, N, H, Dh)
        if isinstance(self.txt, ContextStream):
            txt_k, txt_v = self.txt.kv_heads(txt, cond)
            keys = torch.cat([k, txt_k], dim=1).transpose(1, 2)  # (B, H, N+L, Dh)
            values = torch.cat([v, txt_v], dim=1).transpose(1, 2)
            img_out = attention(q.transpose(1, 2), keys, values)  # (B, N, D)
            x = self.img.finish(x, img_out, img_attn, img_mlp)
            return x.view(batch, height, width, dim), None
        txt_attn, txt_mlp = self.txt.modulations(cond)
        txt_q, txt_k, txt_v = self.txt.qkv_heads(txt, txt_attn)  # each (B, L, H, Dh)
        out = attention(torch.cat([q, txt_q], dim=1).transpose(1, 2),  # (B, H, N+L, Dh)
                        torch.cat([k, txt_k], dim=1).transpose(1, 2),
                        torch.cat([v, txt_v], dim=1).transpose(1, 2))  # (B, N+L, D)
        # split, not two slices: its backward is one cat instead of two zero-filled copies.
        img_out, txt_out = out.split([x.shape[1], txt.shape[1]], dim=1)
        x = self.img.finish(x, img_out, img_attn, img_mlp)
        txt = self.txt.finish(txt, txt_out, txt_attn, txt_mlp)
        return x.view(batch, height, width, dim), txt


@functools.cache
def _compiled_block_forward():
    """``JointBlock.joint_forward`` through torch.compile, built once per process.

    Compiling the unbound function, not each block, lets every block of one kind share a
    graph (parameters are graph inputs), and keeps ``copy.deepcopy`` of a model (the EMA)
    from sharing compiled code bound to the original block.
    """
    return torch.compile(JointBlock.joint_forward)


class FinalLayer(nn.Module):
    """adaLN (no gate) + Linear + unpatchify: image tokens (B, h, w, D) → velocity (B, C, H, W)."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.out_channels = cfg.out_channels
        self.mod = nn.Linear(cfg.dim, 2 * cfg.dim)  # scale, then shift (SD3's AdaLayerNormContinuous)
        self.linear = nn.Linear(cfg.dim, cfg.patch_size ** 2 * cfg.out_channels)  # rows: (p, q, C)

    def forward(self, img: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        batch, height, width, dim = img.shape
        scale, shift = self.mod(cond).chunk(2, dim=-1)
        x = Modulation(shift, scale).apply(layer_norm(img.view(batch, height * width, dim)))
        patch = self.patch_size
        out = self.linear(x).view(batch, height, width, patch, patch, self.out_channels)
        out = out.permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, q)
        return out.reshape(batch, self.out_channels, height * patch, width * patch)


class _EmbedLayer(nn.Module):
    """Pipeline adapter: (img, t, txt, vec[, s]) → (img_tokens, txt_tokens, cond)."""

    def __init__(self, embed: MMDiTEmbed):
        super().__init__()
        self.embed = embed

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return self.embed(*inputs)


class _BlockLayer(nn.Module):
    """Pipeline adapter: (img_tokens, txt_tokens, cond) → the same, or (img_tokens, cond)
    after the last block, whose text stream ends."""

    def __init__(self, block: JointBlock):
        super().__init__()
        self.block = block

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        img, txt, cond = inputs
        img, txt = self.block(img, txt, cond)
        return (img, cond) if txt is None else (img, txt, cond)


class _FinalLayer(nn.Module):
    """Pipeline adapter: (img_tokens, cond) → velocity (B, C, H, W)."""

    def __init__(self, final: FinalLayer):
        super().__init__()
        self.final = final

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.final(*inputs)


class MMDiT(nn.Module):
    """``model(img, t, txt, vec)``: img (B, C, H, W), t (B,) in [0, 1] (1 = noise),
    txt (B, L, txt_dim), vec (B, vec_dim) → velocity (B, out_channels, H, W).

    A flow map (``flow_map=True``) also takes ``s`` (B,), the end time of the jump, and returns
    the average velocity u(img, t, s) (B, out_channels, H, W); without s it is the velocity u(img, t, t)."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.config = cfg
        self.embed = MMDiTEmbed(cfg)
        self.blocks = nn.ModuleList([JointBlock(cfg, last=index == cfg.depth - 1) for index in range(cfg.depth)])
        self.final = FinalLayer(cfg)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT initialisation: Xavier linears, N(0, 0.02) embedding MLPs, and adaLN-Zero:
        every modulation and the final linear start at zero, so each block starts as the
        identity and the initial velocity is exactly zero. A flow map's jump embedding ends in a
        zero layer too, so the end time starts without effect."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.RMSNorm):
                nn.init.ones_(module.weight)
        for embedder in (self.embed.time, self.embed.pooled):
            nn.init.normal_(embedder.linear_1.weight, std=0.02)
            nn.init.normal_(embedder.linear_2.weight, std=0.02)
        zeroed = [block.img.mod for block in self.blocks] + [block.txt.mod for block in self.blocks]
        if self.embed.jump is not None:
            nn.init.normal_(self.embed.jump.linear_1.weight, std=0.02)
            zeroed.append(self.embed.jump.linear_2)
        for linear in zeroed + [self.final.mod, self.final.linear]:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, img: torch.Tensor, t: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor,
                s: torch.Tensor | None = None) -> torch.Tensor:
        img_tokens, txt_tokens, cond = self.embed(img, t, txt, vec, s)  # (B, h, w, D), (B, L, D), (B, D)
        for block in self.blocks:
            img_tokens, txt_tokens = block(img_tokens, txt_tokens, cond)
        return self.final(img_tokens, cond)

    def compile_blocks(self) -> None:
        """Run the joint blocks through torch.compile (inductor) whenever gradients are enabled.

        The same function (up to float rounding), faster training steps after a one-off
        compile: two graphs, one for the blocks and one for the last block. Without
        gradients (sampling, evaluation) the blocks run eagerly, sparing more compiles.
        """
        for block in self.blocks:
            block.compiled = True

    def pipeline_layers(self) -> list[nn.Module]:
        """The model as a flat list for pipeline stages: embed, each block, final layer.

        Each layer takes one tuple of tensors and returns the next one; chaining them from
        ``(img, t, txt, vec)`` (a flow map's ``(img, t, txt, vec, s)``) gives ``forward``'s output. The layers share this model's
        parameters: layer 0 holds ``embed``, layer i+1 holds ``blocks[i]``, the last holds
        ``final``.
        """
        return [_EmbedLayer(self.embed), *[_BlockLayer(block) for block in self.blocks], _FinalLayer(self.final)]
