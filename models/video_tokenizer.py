"""Video tokenizer in the style of FlexTok / VideoFlexTok: a clip becomes a 1-D, coarse-to-fine
sequence of K discrete tokens, and a rectified-flow decoder turns any prefix of it back into
a clip.

* Encoder: space-time patches of a (B, T, C, H, W) clip plus K registers (each a learned vector
  plus a learned spatial mix of the patches) go through a transformer; patches attend to
  patches, register i attends to all patches and to registers 0..i. The registers are projected
  to ``len(fsq_levels)`` channels and quantized with FSQ.
* Nested dropout: in training only the first k tokens are kept (k drawn per clip), the others
  are replaced by a learned mask token. Because register i never sees registers after it, the
  first tokens must carry the most information on their own.
* Decoder: a DiT over [tokens ; noisy patches] predicts the flow velocity of the patches,
  conditioned on time through adaLN. With probability ``cfg_drop_prob`` all tokens are
  masked (k = 0), which is the null condition for classifier-free guidance.

Flow convention (all of flowmill): t = 0 is data, t = 1 is noise,
``x_t = (1 - t)·x0 + t·noise`` and the velocity target is ``v = noise - x0``; sampling
integrates from t = 1 to t = 0. Shapes: B batch, N = (T/pt)(H/ph)(W/pw) patches,
P = pt·ph·pw·C values per patch, K registers, D width, d = len(fsq_levels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from flowmill.models.flow_path import FlowPath, LogitNormalTimesteps
from flowmill.models.fsq import FSQ
from flowmill.models.layers import DiTBlock, MLPEmbedder, Modulation, sincos_pe_3d, timestep_embedding
from flowmill.models.samplers import build_sampler, guided

KEEP_K_DISTRIBUTIONS = ("pow2", "uniform")
PREDICTIONS = ("x", "v")
# x-prediction divides by t: below this time the velocity uses it instead (as JiT, arXiv:2511.13720, does).
X_PREDICTION_MIN_T = 0.05
TIME_EMBED_DIM = 256  # sinusoidal features fed to the timestep MLP, as in DiT/SD3


@dataclass
class VideoTokenizerConfig:
    """Sizes of the video tokenizer; defaults follow FlexTok d18-d18 widths on 16×32×32 clips."""

    frames: int = 16  # T, frames per clip
    image_size: int = 32  # H = W, pixels per side
    channels: int = 3  # C, colour channels of the clip (values in [-1, 1])
    tubelet: tuple[int, int, int] = (2, 4, 4)  # (pt, ph, pw): frames × pixels × pixels per patch
    dim: int = 1152  # D, transformer width of encoder and decoder (FlexTok: 64·depth)
    encoder_depth: int = 18  # number of encoder blocks
    decoder_depth: int = 18  # number of decoder blocks
    num_heads: int = 18  # attention heads per block (head width D / heads)
    mlp_ratio: float = 4.0  # feed-forward hidden width as a multiple of D
    num_registers: int = 256  # K, tokens per clip (the longest prefix)
    fsq_levels: tuple[int, ...] = (8, 8, 8, 5, 5, 5)  # FSQ levels per token channel (FlexTok: 64000 codes)
    keep_k_distribution: str = "pow2"  # nested dropout: "pow2" = k uniform over 1, 2, 4, .., K; "uniform" = k uniform in 1..K
    cfg_drop_prob: float = 0.1  # probability that a training clip sees no tokens at all (CFG null condition)
    logit_normal_mean: float = 0.0  # training t = sigmoid(mean + std·n), n ~ N(0, 1) (SD3's logit-normal)
    logit_normal_std: float = 1.0  # spread of the logit-normal timestep distribution
    noise_only_prob: float = 0.25  # fraction of training clips decoded from pure noise (t = 1), where only the tokens tell the clip apart: a direct autoencoding signal for the encoder
    latent_norm: bool = True  # standardise each pre-FSQ latent over the batch (running statistics at inference); see __init__
    prediction: str = "x"  # decoder output: "x" = clean patches, velocity (x_t - x̂0)/t (pixel patches wider than dim need it) | "v" = the velocity

    def __post_init__(self) -> None:
        self.tubelet = tuple(self.tubelet)
        self.fsq_levels = tuple(self.fsq_levels)
        if len(self.tubelet) != 3:
            raise ValueError(f"tubelet must be (pt, ph, pw), got {self.tubelet}")
        pt, ph, pw = self.tubelet
        if self.frames % pt or self.image_size % ph or self.image_size % pw:
            raise ValueError(
                f"tubelet {self.tubelet} must divide the clip (frames={self.frames}, "
                f"image_size={self.image_size} × {self.image_size})"
            )
        if not self.fsq_levels or any(not isinstance(level, int) or level < 2 for level in self.fsq_levels):
            raise ValueError(f"fsq_levels must be integers >= 2, one per token channel, got {list(self.fsq_levels)}")
        if math.prod(self.fsq_levels) >= 2**62:
            raise ValueError(f"fsq_levels {list(self.fsq_levels)} make {math.prod(self.fsq_levels):.3g} codes, too many "
                             "for a 64-bit token index; use fewer channels or levels")
        if len(self.fsq_levels) > self.dim:
            raise ValueError(
                f"fsq_levels has {len(self.fsq_levels)} channels, more than the width dim={self.dim} it quantizes a "
                f"projection of; use at most {self.dim} levels"
            )
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.num_registers < 1:
            raise ValueError(f"num_registers must be >= 1, got {self.num_registers}")
        if self.keep_k_distribution not in KEEP_K_DISTRIBUTIONS:
            raise ValueError(
                f"unknown keep_k_distribution '{self.keep_k_distribution}'; choose one of: "
                f"{', '.join(KEEP_K_DISTRIBUTIONS)}"
            )
        if self.keep_k_distribution == "pow2" and self.num_registers & (self.num_registers - 1):
            raise ValueError(
                f"keep_k_distribution 'pow2' needs num_registers to be a power of two, got "
                f"{self.num_registers}; use 'uniform' or change num_registers"
            )
        if not 0.0 <= self.cfg_drop_prob < 1.0:
            raise ValueError(f"cfg_drop_prob must be in [0, 1), got {self.cfg_drop_prob}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction '{self.prediction}'; choose one of: {', '.join(PREDICTIONS)}")
        if not 0.0 <= self.noise_only_prob < 1.0:
            raise ValueError(f"noise_only_prob must be in [0, 1), got {self.noise_only_prob}")
        if self.logit_normal_std <= 0:
            raise ValueError(f"logit_normal_std must be > 0, got {self.logit_normal_std}")

    @property
    def patch_grid(self) -> tuple[int, int, int]:
        """(T', H', W'), patches per clip along time, rows and columns."""
        pt, ph, pw = self.tubelet
        return self.frames // pt, self.image_size // ph, self.image_size // pw

    @property
    def num_patches(self) -> int:
        """N, space-time patches per clip."""
        return math.prod(self.patch_grid)

    @property
    def patch_values(self) -> int:
        """P, pixel values per patch."""
        pt, ph, pw = self.tubelet
        return pt * ph * pw * self.channels

    @property
    def keep_k_choices(self) -> list[int]:
        """The prefix lengths nested dropout samples from."""
        if self.keep_k_distribution == "pow2":
            return [1 << i for i in range(self.num_registers.bit_length())]
        return list(range(1, self.num_registers + 1))


VIDEO_TOKENIZER_SIZES: dict[str, VideoTokenizerConfig] = {
    "tiny": VideoTokenizerConfig(
        dim=64, encoder_depth=2, decoder_depth=2, num_heads=4, num_registers=16, fsq_levels=(5, 5, 5)
    ),
    "d12": VideoTokenizerConfig(dim=768, encoder_depth=12, decoder_depth=12, num_heads=12),
    "d18": VideoTokenizerConfig(),
}


def video_tokenizer_config(size: str, **overrides) -> VideoTokenizerConfig:
    """The named size from ``VIDEO_TOKENIZER_SIZES`` with fields replaced by ``overrides`` (e.g. frames=4)."""
    if size not in VIDEO_TOKENIZER_SIZES:
        raise ValueError(f"unknown video tokenizer size '{size}'; choose one of: {', '.join(VIDEO_TOKENIZER_SIZES)}")
    return replace(VIDEO_TOKENIZER_SIZES[size], **overrides)


def _draw(draw, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    # Drawn where the generator lives, then moved: a seed gives the same draws on any device.
    source = generator.device if generator is not None else device
    return draw(shape, generator=generator, device=source).to(device)


def patchify(video: torch.Tensor, tubelet: tuple[int, int, int]) -> torch.Tensor:
    """(B, T, C, H, W) clip → (B, N, P) patches in (time, row, column) order."""
    pt, ph, pw = tubelet
    batch, frames, channels, height, width = video.shape
    x = video.reshape(batch, frames // pt, pt, channels, height // ph, ph, width // pw, pw)
    x = x.permute(0, 1, 4, 6, 2, 5, 7, 3)  # (B, T', H', W', pt, ph, pw, C)
    return x.reshape(batch, -1, pt * ph * pw * channels)


def unpatchify(patches: torch.Tensor, tubelet: tuple[int, int, int], frames: int, channels: int, size: int) -> torch.Tensor:
    """(B, N, P) patches → (B, T, C, H, W) clip; inverse of ``patchify``."""
    pt, ph, pw = tubelet
    batch = patches.shape[0]
    x = patches.reshape(batch, frames // pt, size // ph, size // pw, pt, ph, pw, channels)
    x = x.permute(0, 1, 4, 7, 2, 5, 3, 6)  # (B, T', pt, C, H', ph, W', pw)
    return x.reshape(batch, frames, channels, size, size)


@dataclass
class EncodedVideo:
    """The tokens of a batch of clips."""

    indices: torch.Tensor  # (B, K) int64 FSQ indices, coarse to fine
    codes: torch.Tensor  # (B, K, d) FSQ codes in [-1, 1], straight-through differentiable


class VideoTokenizer(nn.Module):
    """Encoder (clip → K FSQ tokens) and rectified-flow decoder (token prefix → clip).

    Training calls ``loss(video, generator)``; inference calls ``encode(video)`` and
    ``decode(indices[:, :k], steps, cfg_scale, generator)``.
    """

    def __init__(self, config: VideoTokenizerConfig):
        super().__init__()
        self.config = config
        dim, num_patches, patch_values = config.dim, config.num_patches, config.patch_values
        std = 0.02

        # Encoder. Its blocks are DiT blocks whose adaLN input is one learned vector (no
        # timestep exists here), which reduces adaLN to learned per-block norm affines and
        # gates. The gates start at 1, not DiT's 0: identity blocks would hand every clip the
        # same registers, so all clips would start with the same tokens.
        self.enc_patch_embed = nn.Linear(patch_values, dim)
        # Fixed sincos positions, shared by encoder and decoder. A learned table would start at
        # std 0.02 beside noisy patches of std ~0.6: the decoder could not tell one noise patch's
        # place from another's, so it could not put the tokens' content anywhere (it measurably
        # ignored them), and registers averaging over patches lost where the digits were.
        self.register_buffer("patch_pos", sincos_pe_3d(dim, config.patch_grid), persistent=False)  # (N, D)
        self.registers = nn.Parameter(torch.randn(config.num_registers, dim) * std)
        # Each register also starts as its own random spatial mix of the patches. Registers that
        # only query patches start as near-uniform averages of them, which hold what a clip
        # contains but not where; the first gradient steps then collapsed every register to about
        # one number per clip. With the mix they start as informative as a random projection of
        # the clip and stay so.
        self.register_pool = nn.Parameter(torch.randn(config.num_registers, num_patches) / math.sqrt(num_patches))
        self.enc_cond = nn.Parameter(torch.randn(dim) * std)
        self.encoder = nn.ModuleList(
            DiTBlock(dim, config.num_heads, dim, config.mlp_ratio) for _ in range(config.encoder_depth)
        )
        with torch.no_grad():
            for block in self.encoder:
                block.modulation[1].bias.view(6, dim)[[2, 5]] = 1.0  # attention and MLP gates
        self.enc_norm = nn.LayerNorm(dim)
        self.fsq = FSQ(list(config.fsq_levels))
        self.flow_path = FlowPath()
        self.timesteps = LogitNormalTimesteps(config.logit_normal_mean, config.logit_normal_std)
        self.to_fsq = nn.Linear(dim, self.fsq.dim)
        # Mostly-black clips give registers that barely differ between clips, and a decoder that
        # does not use its tokens yet gives the encoder no signal: the latents then drift into
        # tanh's flat ends and every clip gets the same codes for good. Standardising each of the
        # K·d latents over the batch spreads clips over the FSQ grid from the first step.
        self.latent_norm = (
            nn.BatchNorm1d(config.num_registers * self.fsq.dim, affine=False, momentum=0.05) if config.latent_norm else nn.Identity()
        )
        self.register_buffer("enc_mask", self._encoder_mask(num_patches, config.num_registers), persistent=False)

        # Decoder.
        self.from_fsq = nn.Linear(self.fsq.dim, dim)
        self.mask_token = nn.Parameter(torch.randn(dim) * std)
        self.token_pos = nn.Parameter(torch.randn(config.num_registers, dim) * std)
        self.dec_patch_embed = nn.Linear(patch_values, dim)
        self.time_embed = MLPEmbedder(TIME_EMBED_DIM, dim)
        self.decoder = nn.ModuleList(
            DiTBlock(dim, config.num_heads, dim, config.mlp_ratio) for _ in range(config.decoder_depth)
        )
        self.dec_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.dec_final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        self.dec_out = nn.Linear(dim, patch_values)
        # Zero-initialised output: a fresh decoder predicts v = 0 (DiT's adaLN-Zero recipe).
        for layer in (self.dec_final_modulation[1], self.dec_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @staticmethod
    def _encoder_mask(num_patches: int, num_registers: int) -> torch.Tensor:
        """(N+K, N+K) boolean attention mask, True = may attend.

        Patches see all patches and no register; register i sees all patches and registers
        0..i, so a token prefix never depends on the registers after it.
        """
        length = num_patches + num_registers
        mask = torch.zeros(length, length, dtype=torch.bool)
        mask[:, :num_patches] = True
        mask[num_patches:, num_patches:] = torch.ones(num_registers, num_registers, dtype=torch.bool).tril()
        return mask

    def _check_video(self, video: torch.Tensor) -> None:
        cfg = self.config
        expected = (cfg.frames, cfg.channels, cfg.image_size, cfg.image_size)
        if video.dim() != 5 or tuple(video.shape[1:]) != expected:
            raise ValueError(
                f"expected a clip batch of shape (B, T, C, H, W) = (B, {', '.join(map(str, expected))}), "
                f"got {tuple(video.shape)}"
            )
        if not video.dtype.is_floating_point:
            raise ValueError(f"expected a floating-point clip with values in [-1, 1], got dtype {video.dtype}")

    # ----- encoder -------------------------------------------------------------------------

    def register_latents(self, video: torch.Tensor) -> torch.Tensor:
        """(B, T, C, H, W) clips in [-1, 1] → (B, K, d) continuous latents before FSQ."""
        self._check_video(video)
        batch = video.shape[0]
        patches = self.enc_patch_embed(patchify(video, self.config.tubelet)) + self.patch_pos  # (B, N, D)
        registers = self.registers + torch.einsum("kn,bnd->bkd", self.register_pool, patches)  # (B, K, D)
        x = torch.cat([patches, registers], dim=1)  # (B, N+K, D)
        cond = self.enc_cond.expand(batch, -1)  # (B, D)
        for block in self.encoder:
            x = block(x, cond, self.enc_mask)
        latents = self.to_fsq(self.enc_norm(x[:, self.config.num_patches :]))  # (B, K, d)
        return self.latent_norm(latents.flatten(1)).view_as(latents)

    def encode(self, video: torch.Tensor) -> EncodedVideo:
        """(B, T, C, H, W) clips in [-1, 1] → K tokens per clip (indices and codes)."""
        codes, indices = self.fsq(self.register_latents(video))
        return EncodedVideo(indices=indices, codes=codes)

    # ----- decoder -------------------------------------------------------------------------

    def token_condition(self, codes: torch.Tensor, keep_k: torch.Tensor) -> torch.Tensor:
        """Decoder condition from (B, K, d) codes keeping the first ``keep_k`` (B,) of each clip.

        Positions >= keep_k become the learned mask token, so what was there cannot leak;
        keep_k = 0 is the unconditional (CFG null) condition. Returns (B, K, D).
        """
        positions = torch.arange(self.config.num_registers, device=codes.device)
        kept = positions[None, :] < keep_k[:, None]  # (B, K)
        tokens = torch.where(kept[..., None], self.from_fsq(codes), self.mask_token)
        return tokens + self.token_pos

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Predicted velocity (B, N, P) of noisy patches x_t (B, N, P) at times t (B,) given cond (B, K, D).

        With ``prediction="x"`` the network predicts the clean patches x̂0 and the velocity is
        (x_t - x̂0) / t: a patch of P pixel values wider than the width D cannot carry the noise
        part of v through the network, but clean patches of a low-dimensional video can.
        """
        out = self.decoder_output(x_t, t, cond)
        if self.config.prediction == "v":
            return out
        return (x_t - out) / t.clamp_min(X_PREDICTION_MIN_T).to(x_t.dtype)[:, None, None]

    def decoder_output(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """What the decoder network predicts (B, N, P): the velocity or the clean patches (``prediction``)."""
        time = self.time_embed(timestep_embedding(1000 * t, TIME_EMBED_DIM).to(x_t.dtype))  # (B, D)
        patches = self.dec_patch_embed(x_t) + self.patch_pos  # (B, N, D)
        x = torch.cat([cond, patches], dim=1)  # (B, K+N, D)
        for block in self.decoder:
            x = block(x, time)
        shift, scale = self.dec_final_modulation(time).chunk(2, dim=-1)
        x = Modulation(shift, scale).apply(self.dec_norm(x[:, self.config.num_registers :]))
        return self.dec_out(x)

    # ----- training ------------------------------------------------------------------------

    def sample_keep_k(self, batch: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B,) int64 prefix lengths: nested dropout's k per clip, 0 for CFG-dropped clips."""
        choices = torch.tensor(self.config.keep_k_choices, device=device)
        pick = (_draw(torch.rand, (batch,), generator, device) * len(choices)).long().clamp_max(len(choices) - 1)
        keep_k = choices[pick]
        dropped = _draw(torch.rand, (batch,), generator, device) < self.config.cfg_drop_prob
        return keep_k.masked_fill(dropped, 0)

    def draw(
        self, batch: int, device: torch.device, generator: torch.Generator | None = None, keep_k: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The random draws of one training batch: prefix lengths (B,), noise (B, N, P) and times (B,).

        ``keep_k=None`` draws nested dropout and CFG dropout per clip (training); an int keeps
        exactly that many tokens for every clip, without CFG dropout (evaluation of a prefix).
        """
        cfg = self.config
        if keep_k is None:
            keep = self.sample_keep_k(batch, device, generator)
        else:
            self._check_prefix_length(keep_k)
            keep = torch.full((batch,), keep_k, device=device, dtype=torch.long)
        noise = _draw(torch.randn, (batch, cfg.num_patches, cfg.patch_values), generator, device)
        t = self.timesteps.sample(batch, generator, device)
        # A decoder that sees the clip through x_t has no use for the tokens at first; at t = 1 it
        # sees none of it, so the tokens are all it has.
        noise_only = _draw(torch.rand, (batch,), generator, device) < self.config.noise_only_prob
        return keep, noise, t.masked_fill(noise_only, 1.0)

    def loss(
        self, video: torch.Tensor, generator: torch.Generator | None = None, keep_k: int | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Rectified-flow loss of (B, T, C, H, W) clips, trained end to end through FSQ.

        ``keep_k`` as in ``draw``; ``generator`` drives every random draw. Returns the scalar
        loss and a dict of detached 0-dim metric tensors (flow_loss, keep_k_mean, codebook_usage).
        """
        self._check_video(video)
        return self(video, *self.draw(video.shape[0], video.device, generator, keep_k))

    def forward(
        self, video: torch.Tensor, keep: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss given the draws of ``draw``: clips (B, T, C, H, W), prefix lengths (B,), noise
        (B, N, P), times (B,). Training goes through here because DeepSpeed ZeRO-3 gathers a
        module's own parameters (registers, register pool, token positions, mask token) only
        around ``forward``, and a DeepSpeed engine passes tensors only."""
        encoded = self.encode(video)
        cond = self.token_condition(encoded.codes, keep)
        x0 = patchify(video, self.config.tubelet)  # (B, N, P)
        path = self.flow_path.sample(x0, noise.to(x0.dtype), t)
        # With x-prediction the loss is on the clean patches, not on the velocity: the velocity error
        # is the clean error over t², so the rare clips near t = 0 (weight up to 400) would drown the
        # clips near t = 1, the only ones that teach the encoder (there the tokens are all there is).
        target = path.target if self.config.prediction == "v" else x0
        loss = F.mse_loss(self.decoder_output(path.x_t, t, cond).float(), target.float())

        # Codebook usage without .unique(), which would synchronise a GPU every step.
        used = torch.zeros(self.fsq.codebook_size, device=video.device).index_fill_(0, encoded.indices.flatten(), 1.0)
        metrics = {
            "flow_loss": loss.detach(),  # mean squared error of the velocity (prediction v) or of the clean patches (x)
            "keep_k_mean": keep.float().mean(),  # tokens the decoder saw, 0 for CFG-dropped clips
            "codebook_usage": used.mean(),  # fraction of FSQ codes used by the batch
        }
        return loss, metrics

    # ----- sampling ------------------------------------------------------------------------

    def _check_prefix_length(self, keep_k: int) -> None:
        if not 1 <= keep_k <= self.config.num_registers:
            raise ValueError(f"a token prefix must have 1..{self.config.num_registers} tokens, got {keep_k}")

    @torch.no_grad()
    def decode(
        self,
        indices: torch.Tensor,
        steps: int = 25,
        cfg_scale: float = 1.0,
        generator: torch.Generator | None = None,
        sampler: str = "euler",
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Generate (B, T, C, H, W) clips (unclamped, ~[-1, 1]) from token prefixes (B, k), 1 <= k <= K.

        Integrates the velocity from t = 1 (noise) to t = 0 in ``steps`` steps with the
        ``sampler`` of ``flowmill.models.samplers`` (euler, heun); ``cfg_scale`` != 1 guides
        with the tokenless velocity, ``v = v_null + cfg_scale·(v_cond - v_null)``. The starting
        noise (B, N, P) is ``noise`` when given, else drawn from ``generator``.
        """
        if indices.dim() != 2:
            raise ValueError(f"expected token indices of shape (B, k), got {tuple(indices.shape)}")
        cfg = self.config
        batch, prefix = indices.shape
        self._check_prefix_length(prefix)
        solver = build_sampler(sampler)
        device = self.dec_out.weight.device
        dtype = self.dec_out.weight.dtype

        codes = F.pad(self.fsq.indices_to_codes(indices.to(device)), (0, 0, 0, cfg.num_registers - prefix))
        codes = codes.to(dtype)  # (B, K, d); the padding is masked by the condition
        cond = self.token_condition(codes, torch.full((batch,), prefix, device=device))
        null = self.token_condition(codes, torch.zeros(batch, dtype=torch.long, device=device))
        both = torch.cat([cond, null])  # (2B, K, D)

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if cfg_scale == 1.0:  # guidance is the identity: skip the tokenless half
                return self.velocity(x, t, cond)
            v_cond, v_null = self.velocity(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
            return guided(v_cond, v_null, cfg_scale)

        shape = (batch, cfg.num_patches, cfg.patch_values)
        if noise is None:
            noise = _draw(torch.randn, shape, generator, device)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise of shape {tuple(noise.shape)} for {batch} clips; expected {shape}")
        x0 = solver.sample(velocity, noise.to(device, dtype), steps)
        return unpatchify(x0, cfg.tubelet, cfg.frames, cfg.channels, cfg.image_size)
