"""Video tokenizer (``task: video_tokenizer``): clips → K coarse-to-fine FSQ tokens → clips.

The model is ``flowmill.models.video_tokenizer`` (encoder, FSQ, nested dropout, rectified-flow
decoder; t = 0 is data, t = 1 is noise). Data are clips packed by ``flowmill data pack video``
or the built-in moving digits: ``npy`` uint8 (T, H, W, 3), or ``mp4``.

Every evaluation logs ``val/loss`` (the flow loss with all K tokens on a fixed time grid and
fixed noise), ``val/loss_k{k}`` per token count, and reconstruction quality of held-out clips
decoded from their first k tokens, ``recon/psnr_k{k}`` and ``recon/ssim_k{k}``. The samples of
every evaluation are a GIF (input, then its reconstructions from 1, 2, 4, ... K tokens) and the
PSNR/SSIM-versus-k plots. ``flowmill reconstruct`` and ``flowmill data encode`` (with
``token_encoder``) use a trained run.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from flowmill.data.decode import CLIP_FITS, ClipDecoder, clip_tensor, fit_clip
from flowmill.data.remote import Storage
from flowmill.data.shards import read_manifest
from flowmill.data.video import encode_mp4, read_video
from flowmill.errors import UsageError
from flowmill.models.samplers import build_sampler
from flowmill.models.video_tokenizer import VIDEO_TOKENIZER_SIZES, VideoTokenizer, VideoTokenizerConfig, patchify
from flowmill.run_dir import Checkpoint, RunDir
from flowmill.train.config import Config
from flowmill.train.distributed import DistEnv
from flowmill.train.evaluation import (
    Totals,
    alone,
    eval_chunks,
    gather_rows,
)
from flowmill.train.sample import load_task_and_model
from flowmill.train.tasks.base import Task
from flowmill.train.video_metrics import psnr_per_clip, ssim_per_clip
from flowmill.train.videos import clip_uint8, quality_plot, side_by_side_gif
from flowmill.weights import read_ema, weights_sha256

FAMILY = "video_tokenizer"
CLIP_FIELDS = ("npy", "mp4")


@dataclass
class VideoConfig:
    field: str = "npy"  # the clip's field in the shards: npy (uint8 (T, H, W, 3)) or mp4 (decoded with PyAV)
    fit: str = "error"  # clips of another shape: error (skip as bad / refuse) | crop (first T frames, shorter side resized, centre-cropped)


@dataclass
class ReconConfig:
    num_tokens: list[int] = field(default_factory=list)  # token counts k of the reconstruction metrics (empty: 1, 2, 4, ..., K)
    num_clips: int = 16  # held-out clips decoded at each evaluation (the first of eval.path, or of data.path)
    steps: int | None = None  # decoder steps of the reconstructions (None: sample.steps); 1 = the decoder's estimate of the clip, best in PSNR


@dataclass
class VideoTokenizerModelConfig(VideoTokenizerConfig):
    """The video tokenizer's architecture, optionally from a preset size."""

    presets: ClassVar[dict[str, VideoTokenizerConfig]] = VIDEO_TOKENIZER_SIZES
    size: str | None = None  # a preset from VIDEO_TOKENIZER_SIZES (tiny, d12, d18); fields given beside it override it

    def architecture(self) -> VideoTokenizerConfig:
        """The plain VideoTokenizerConfig: what defines the model's function and its weights."""
        return VideoTokenizerConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(VideoTokenizerConfig)})


@dataclass(frozen=True)
class VideoTokenizerRunConfig(Config):
    task: str = "video_tokenizer"
    model: VideoTokenizerModelConfig = field(default_factory=VideoTokenizerModelConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    recon: ReconConfig = field(default_factory=ReconConfig)


@dataclass
class Reconstructions:
    """Held-out clips decoded from their first k tokens at one training step."""

    step: int
    held_out: torch.Tensor  # (S, T, C, H, W) in [-1, 1]: the first sample.num_per_prompt clips
    decoded: dict[int, torch.Tensor]  # k -> (S, T, C, H, W): those clips decoded
    scores: dict[int, tuple[float, float]]  # k -> (PSNR dB, SSIM) over all recon.num_clips clips


class VideoTokenizerTask(Task):
    config_class = VideoTokenizerRunConfig
    family = FAMILY
    cfg: VideoTokenizerRunConfig

    @classmethod
    def validate_config(cls, cfg: VideoTokenizerRunConfig) -> None:
        if cfg.video.field not in CLIP_FIELDS:
            raise UsageError(f"video.field: {cfg.video.field!r} is not one of {', '.join(CLIP_FIELDS)}")
        if cfg.video.fit not in CLIP_FITS:
            raise UsageError(f"video.fit: {cfg.video.fit!r} is not one of {', '.join(CLIP_FITS)}")
        if cfg.model.channels != 3:
            raise UsageError(f"model.channels: clips are RGB (T, H, W, 3); set model.channels=3, got {cfg.model.channels}")
        bad = [k for k in cfg.recon.num_tokens if not 1 <= k <= cfg.model.num_registers]
        if bad:
            raise UsageError(f"recon.num_tokens: {bad} outside 1..model.num_registers={cfg.model.num_registers}")
        if cfg.recon.num_clips < 1:
            raise UsageError(f"recon.num_clips: must be at least 1, got {cfg.recon.num_clips}")
        if cfg.recon.steps is not None and cfg.recon.steps < 1:
            raise UsageError(f"recon.steps: must be at least 1 decoder step (or null for sample.steps), got {cfg.recon.steps}")
        if cfg.model.latent_norm and cfg.trainer.micro_batch_size < 2:
            raise UsageError("trainer.micro_batch_size: model.latent_norm standardises latents over the batch, which needs "
                              "at least 2 clips per micro-batch")
        if cfg.sample.prompts:
            raise UsageError("sample.prompts: a video tokenizer reconstructs clips and takes no prompts; remove them")
        if cfg.parallel.pipeline_stages > 1:
            raise UsageError("parallel.pipeline_stages: the video tokenizer trains without pipeline stages (ZeRO 0-3); set it to 1")

    def __init__(self, cfg: VideoTokenizerRunConfig, env: DistEnv, run_dir: RunDir):
        super().__init__(cfg, env, run_dir)
        self.live: VideoTokenizer | None = None  # the model being trained, for its random draws
        self._val_clips: torch.Tensor | None = None
        self._last_recon: Reconstructions | None = None  # of the last evaluation or samples

    @property
    def num_tokens(self) -> list[int]:
        """The token counts k of the evaluation, ascending."""
        return sorted(set(self.cfg.recon.num_tokens)) or self.cfg.model.keep_k_choices

    def build_model(self) -> nn.Module:
        self.live = VideoTokenizer(self.cfg.model.architecture())
        return self.live

    def decoder(self) -> ClipDecoder:
        m = self.cfg.model
        return ClipDecoder(frames=m.frames, size=m.image_size, field=self.cfg.video.field, fit=self.cfg.video.fit)

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        video = batch["video"].to(self.env.device)
        keep, noise, t = self.live.draw(video.shape[0], video.device, generator)
        return model(video, keep, noise, t)

    def validation_clips(self) -> torch.Tensor:
        """The fixed held-out clips (N, T, C, H, W): the first eval.num_samples of eval.path (default data.path)."""
        if self._val_clips is None:
            self._val_clips = self.first_batch(self.cfg.eval.path or self.cfg.data.path, self.cfg.eval.num_samples)["video"]
        return self._val_clips

    def noise(self, model: VideoTokenizer, count: int) -> torch.Tensor:
        """The fixed noise (count, N, P) of ``count`` held-out clips, drawn from trainer.seed for the whole set
        (each rank takes its rows)."""
        shape = (count, model.config.num_patches, model.config.patch_values)
        return torch.randn(shape, generator=torch.Generator().manual_seed(self.cfg.trainer.seed))

    @torch.no_grad()
    def validation_losses(self, model: VideoTokenizer, clips: torch.Tensor, env: DistEnv) -> dict:
        """``val/loss_k{k}``: flow loss from the first k tokens, averaged over eval.timesteps with fixed noise;
        ``val/loss``: the same with all K tokens. Each rank of ``env`` scores its share of ``clips``."""
        device = next(model.parameters()).device
        noise = self.noise(model, len(clips))
        num_registers = model.config.num_registers
        counts = sorted({*self.num_tokens, num_registers})
        totals = Totals(f"val/loss_k{k}" for k in counts)
        for chunk in eval_chunks(len(clips), len(clips), env):
            part = clips[chunk.rows].to(device)
            x0 = patchify(part, model.config.tubelet)
            codes = model.encode(part).codes
            for k in counts:
                cond = model.token_condition(codes, torch.full((len(part),), k, device=device))
                error = torch.zeros(len(part), dtype=torch.float64)
                for value in self.cfg.eval.timesteps:
                    t = torch.full((len(part),), value, device=device)
                    path = model.flow_path.sample(x0, noise[chunk.rows].to(device), t)
                    error += (model.velocity(path.x_t, t, cond).float() - path.target.float()).pow(2).flatten(1).mean(dim=1).cpu()
                totals.add(f"val/loss_k{k}", error.sum() / len(self.cfg.eval.timesteps), len(part))
        metrics = totals.reduced(env)
        metrics["val/loss"] = metrics[f"val/loss_k{num_registers}"]
        return metrics

    @property
    def recon_steps(self) -> int:
        """Decoder steps of the reconstruction metrics: recon.steps, else sample.steps."""
        return self.cfg.recon.steps or self.cfg.sample.steps

    @torch.no_grad()
    def reconstructions(self, model: VideoTokenizer, clips: torch.Tensor, steps: int | None = None,
                        noise: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """{k: clips (N, T, C, H, W) decoded from their first k tokens}, with the sample section's
        solver and guidance, ``steps`` (default: ``recon_steps``) and ``noise`` (N, N_patches, P)
        (default: drawn from trainer.seed, the same at every evaluation)."""
        s = self.cfg.sample
        device = next(model.parameters()).device
        indices = model.encode(clips.to(device)).indices
        noise = self.noise(model, len(clips)) if noise is None else noise
        return {
            k: model.decode(indices[:, :k], steps=steps or self.recon_steps, cfg_scale=s.cfg_scale, sampler=s.sampler,
                            noise=noise).cpu()
            for k in self.num_tokens
        }

    def recon_quality(self, model: nn.Module, step: int, env: DistEnv) -> Reconstructions:
        """PSNR/SSIM per k of the recon.num_clips held-out clips decoded from their first k tokens, and the first
        sample.num_per_prompt of them (for the GIF), made once per step (evaluation and samples of the same
        step share them). Each rank of ``env`` decodes its share; every rank gets the whole result."""
        if self._last_recon is None or self._last_recon.step != step:
            held_out = self.validation_clips()[: self.cfg.recon.num_clips]
            noise = self.noise(model, len(held_out))
            shown = self.cfg.sample.num_per_prompt
            totals = Totals(f"recon/{name}_k{k}" for k in self.num_tokens for name in ("psnr", "ssim"))
            kept = {k: [held_out[:0]] for k in self.num_tokens}  # this rank's decoded clips among the shown ones
            for chunk in eval_chunks(len(held_out), len(held_out), env):
                reference = held_out[chunk.rows]
                decoded = self.reconstructions(model, reference, noise=noise[chunk.rows])
                for k, clips in decoded.items():
                    totals.add(f"recon/psnr_k{k}", psnr_per_clip(clips, reference).double().sum(), len(clips))
                    totals.add(f"recon/ssim_k{k}", ssim_per_clip(clips, reference).sum(), len(clips))
                    kept[k].append(clips[: max(0, shown - chunk.items.start)])
            means = totals.reduced(env)
            decoded_shown = {k: gather_rows(torch.cat(parts), env) for k, parts in kept.items()}
            scores = {k: (means[f"recon/psnr_k{k}"], means[f"recon/ssim_k{k}"]) for k in self.num_tokens}
            self._last_recon = Reconstructions(step, held_out[:shown], decoded_shown, scores)
        return self._last_recon

    def evaluate(self, model: nn.Module, step: int) -> dict:
        metrics = self.validation_losses(model, self.validation_clips(), self.env)
        for k, (psnr_k, ssim_k) in self.recon_quality(model, step, self.env).scores.items():
            metrics[f"recon/psnr_k{k}"] = psnr_k
            metrics[f"recon/ssim_k{k}"] = ssim_k
        return metrics

    def log_samples(self, model: nn.Module, step: int, out_dir: Path) -> list[Path]:
        """``recon-{step}.gif`` (per clip: input, then decoded from 1, 2, 4, ... K tokens) and
        ``psnr-{step}.png``, ``ssim-{step}.png`` (quality against k)."""
        recon = self.recon_quality(model, step, alone(self.env))  # rank 0 alone
        out_dir.mkdir(parents=True, exist_ok=True)
        columns = [recon.held_out, *recon.decoded.values()]
        gif = side_by_side_gif(columns, out_dir / f"recon-{step:08d}.gif")
        ks = list(recon.scores)
        psnr_plot = quality_plot(ks, {"tokenizer": [recon.scores[k][0] for k in ks]}, "PSNR (dB)", out_dir / f"psnr-{step:08d}.png")
        ssim_plot = quality_plot(ks, {"tokenizer": [recon.scores[k][1] for k in ks]}, "SSIM", out_dir / f"ssim-{step:08d}.png")
        return [gif, psnr_plot, ssim_plot]

    def sample_command(self, model: nn.Module, source: Path, args: argparse.Namespace) -> int:
        raise UsageError(f"{source} is a video tokenizer: it reconstructs clips instead of sampling; use "
                          f"`flowmill reconstruct {self.run_dir} INPUT... --num-tokens K --out DIR`")

    # ----- flowmill reconstruct --------------------------------------------------------------

    def read_input(self, path: Path, fit: str) -> np.ndarray:
        """An ``.mp4`` file or an ``.npy`` uint8 (T, H, W, 3) array → a clip of the model's shape (``fit``: see ``fit_clip``)."""
        if not path.is_file():
            raise UsageError(f"{path}: no such file")
        if path.suffix == ".npy":
            try:
                frames = np.load(path, allow_pickle=False)
            except ValueError as error:
                raise UsageError(f"{path}: not a readable .npy array ({error})") from None
        elif path.suffix == ".mp4":
            try:
                frames = read_video(path)
            except Exception as error:  # PyAV raises many types for an unreadable file
                raise UsageError(f"{path}: PyAV cannot read it ({type(error).__name__}: {error})") from None
        else:
            raise UsageError(f"{path}: reconstruct reads .mp4 files and .npy arrays (T, H, W, 3) uint8")
        m = self.cfg.model
        try:
            return fit_clip(frames, m.frames, m.image_size, fit)
        except ValueError as error:
            raise UsageError(f"{path}: {error}") from None

    def reconstruct_command(self, model: VideoTokenizer, source: Path, args: argparse.Namespace) -> int:
        """``<name>.npy`` (uint8, the input's clip shape) and ``<name>.mp4`` per input, decoded from its first k tokens."""

        k = args.num_tokens
        if k is None:
            raise UsageError(f"--num-tokens: decoding needs the number of tokens K; pass --num-tokens 1..{model.config.num_registers}")
        if not args.inputs:
            raise UsageError("INPUT: a video tokenizer reconstructs the .mp4 files or .npy clips given; pass at least one")
        if args.data is not None or args.num_samples is not None:
            raise UsageError("--data, --num-samples: only an autoencoder run reconstructs held-out images; pass INPUT clips")
        if not 1 <= k <= model.config.num_registers:
            raise UsageError(f"--num-tokens: this tokenizer has K={model.config.num_registers} tokens; pass 1..{model.config.num_registers}, got {k}")
        if args.steps < 1:
            raise UsageError(f"--steps: must be at least 1, got {args.steps}")
        try:
            build_sampler(args.sampler)
        except ValueError as error:
            raise UsageError(f"--sampler: {error}") from None
        inputs = [Path(name) for name in args.inputs]
        stems = [path.stem for path in inputs]
        if len(set(stems)) != len(stems):
            raise UsageError(f"inputs share a file name ({', '.join(sorted(s for s in stems if stems.count(s) > 1))}); "
                              "each writes <name>.npy and <name>.mp4 into --out")
        fit = args.fit or self.cfg.video.fit
        if fit not in CLIP_FITS:
            raise UsageError(f"--fit: {fit!r} is not one of {', '.join(CLIP_FITS)}")
        clips = [self.read_input(path, fit) for path in inputs]  # every input checked before any work
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        device = next(model.parameters()).device
        generator = torch.Generator().manual_seed(args.seed)
        for path, clip in zip(inputs, clips):
            video = clip_tensor(clip)[None].to(device)
            indices = model.encode(video).indices[:, :k]
            decoded = clip_uint8(model.decode(indices, steps=args.steps, cfg_scale=args.cfg, sampler=args.sampler,
                                              generator=generator)[0])
            np.save(out / f"{path.stem}.npy", decoded)
            (out / f"{path.stem}.mp4").write_bytes(encode_mp4(decoded))
            print(f"{path} → {out / path.stem}.npy, .mp4 (tokens: {' '.join(map(str, indices[0].tolist()))})")
        print(f"reconstructed {len(inputs)} clip(s) from {k} of {model.config.num_registers} tokens with {source}")
        return 0


# ----- tokens as data (flowmill data encode) ----------------------------------------------------


def token_grid(num_tokens: int) -> tuple[int, int]:
    """(h, w) of the square grid the K codes are laid out on for an image generator (K a square number)."""
    side = int(round(num_tokens**0.5))
    if side * side != num_tokens:
        raise ValueError(f"the token grid needs a square number of tokens, got K={num_tokens}")
    return side, side


class TokenEncoder:
    """A trained video tokenizer (EMA weights) over clip samples, for ``flowmill data encode``.

    Outputs per clip: ``tokens`` int64 (K,) FSQ indices, coarse to fine, and ``codes`` float
    (d, h, w): the K codes in [-1, 1] laid out row by row on an h×w grid, which an MMDiT reads
    as a d-channel latent image (``flow.image_field=codes.npy``). The manifest records the
    tokenizer's weights (sha256), so a generator can check that its decoder is this tokenizer.
    """

    def __init__(self, model: VideoTokenizer, decoder: ClipDecoder, description: dict):
        self.model = model.eval().requires_grad_(False)
        self.clip_decoder = decoder
        self.description = description
        self.grid = token_grid(model.config.num_registers)

    def decode(self, sample: dict) -> dict:
        return self.clip_decoder(sample)

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict[str, torch.Tensor]:
        encoded = self.model.encode(batch["video"])
        codes = encoded.codes.float().transpose(1, 2).reshape(len(encoded.codes), -1, *self.grid)  # (B, d, h, w)
        return {"tokens": encoded.indices, "codes": codes}


def video_tokenizer_sha256(checkpoint: Checkpoint) -> str:
    """sha256 of the EMA weights a tokenizer run decodes and encodes with."""
    return weights_sha256(read_ema(checkpoint))


def token_encoder(run_dir: str) -> TokenEncoder:
    """``--encoder flowmill.train.tasks.video_tokenizer:token_encoder --arg run_dir=RUN``."""
    task, model, checkpoint = load_task_and_model(run_dir)
    if not isinstance(task, VideoTokenizerTask):
        raise ValueError(f"{run_dir} trains a {task.family!r} model, not a video tokenizer")
    description = {
        "video_tokenizer": str(Path(run_dir).resolve()),
        "checkpoint": checkpoint.path.name,
        "weights_sha256": video_tokenizer_sha256(checkpoint),
        "num_tokens": model.config.num_registers,
        "fsq_levels": list(model.config.fsq_levels),
    }
    return TokenEncoder(model, task.decoder(), description)


class TokenVideoDecoder:
    """Turns a generator's token codes back into clips with the video tokenizer that made them.

    A model trained on ``flowmill data encode ... --encoder ...:token_encoder`` shards generates
    codes images (B, d, h, w); they are snapped to the nearest FSQ code and decoded from all K
    tokens. ``check`` refuses data encoded by other tokenizer weights than this decoder's.
    """

    def __init__(self, run_dir: str, device: torch.device):
        try:
            task, model, checkpoint = load_task_and_model(run_dir)
        except UsageError as error:
            raise UsageError(f"flow.token_decoder: {error}") from None
        if not isinstance(task, VideoTokenizerTask):
            raise UsageError(f"flow.token_decoder: {run_dir} trains a {task.family!r} model, not a video tokenizer")
        self.run_dir = run_dir
        self.model = model.to(device)
        self.task = task
        self.weights_sha256 = video_tokenizer_sha256(checkpoint)

    def check(self, source: str, storage: Storage | None = None) -> None:
        """UsageError unless the dataset ``source`` (remote: reached with ``storage``) holds tokens encoded by this decoder's weights."""
        description = read_manifest(source, storage).get("made", {}).get("params", {}).get("args", {}).get("description", {})
        made_with = description.get("weights_sha256")
        if description.get("video_tokenizer") is None or made_with is None:
            raise UsageError(f"flow.token_decoder: {source} was not encoded by a video tokenizer (flowmill data encode "
                              f"--encoder flowmill.train.tasks.video_tokenizer:token_encoder)")
        if made_with != self.weights_sha256:
            raise UsageError(
                f"flow.token_decoder: {source} was encoded by the tokenizer {description['video_tokenizer']} "
                f"({description.get('checkpoint')}, weights sha256 {made_with[:12]}...), but the decoder {self.run_dir} "
                f"has weights {self.weights_sha256[:12]}...; decode with the tokenizer checkpoint that encoded the data"
            )

    def indices(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes images (B, d, h, w) → (B, K) token indices (nearest FSQ codes)."""
        batch, channels = codes.shape[:2]
        fsq = self.model.fsq
        if channels != fsq.dim or codes.shape[2] * codes.shape[3] != self.model.config.num_registers:
            raise ValueError(f"codes of shape {tuple(codes.shape)} do not fit the tokenizer's {fsq.dim} channels × "
                             f"{self.model.config.num_registers} tokens")
        return fsq.codes_to_indices(codes.reshape(batch, channels, -1).transpose(1, 2))

    @torch.no_grad()
    def __call__(self, codes: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """Codes images (B, d, h, w) → clips (B, T, C, H, W) in [-1, 1], decoded with the tokenizer's sample settings."""
        s = self.task.cfg.sample
        indices = self.indices(codes.float()).to(next(self.model.parameters()).device)
        clips = self.model.decode(indices, steps=s.steps, cfg_scale=s.cfg_scale, sampler=s.sampler,
                                  generator=torch.Generator().manual_seed(seed))
        return clips.clamp(-1, 1).cpu()
