"""Autoencoder (``task: autoencoder``): diffusers' ``AutoencoderKL`` trained on packed images, the VAE of
latent flow matching.

The model is ``flowmill.models.vae.Autoencoder``: ``model(images, noise)`` encodes, draws
``z = mean + std · noise`` (the noise from the task's generator, so a resume is exact) and
decodes. The images are decoded like the MMDiT's (``ImageTextDecoder``; captions are ignored).

Loss per image, ``rec + vae.kl_weight · KL / (C·H·W)``:
- ``rec`` is the mean absolute error over pixels (``vae.reconstruction: l1``, the default) or
  the mean squared error (``mse``). L1 is the reconstruction term of the LDM/Stable Diffusion
  autoencoders: its gradient does not fade as the error shrinks, so fine strokes keep being
  learnt, where MSE averages plausible details into blur.
- ``KL`` is the posterior's KL to N(0, I), summed over the latent elements. Divided by the pixel
  values, the loss is LDM's objective (L1 summed over pixels + weight · KL summed over latents)
  per pixel, so LDM's ``kl_weight`` (1e-6) means the same here. The weight is kept small on
  purpose: the KL term only keeps the latents near unit scale and the posterior smooth; a
  strong one pulls every image towards the prior and blurs the reconstructions, and the latents'
  scale is corrected afterwards anyway (``scaling_factor``, measured when a dataset is encoded).

Every evaluation reconstructs the held-out images (the first ``eval.num_samples`` of ``eval.path``,
default ``data.path``) from the posterior mean, as ``LatentSpace.encode`` does, and logs
``val/psnr`` (dB, peak 1 over pixels in [0, 1], clamped, averaged over images), ``val/rec_loss``
(the training reconstruction term) and ``val/kl`` (nats per image). The samples are a grid of
held-out images above their reconstructions. ``flowmill reconstruct RUN`` writes reconstructions
and their PSNR; ``flowmill.models.loading.load_vae(RUN)`` returns the EMA autoencoder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from flowmill.data.decode import ImageTextDecoder, image_uint8
from flowmill.errors import UsageError
from flowmill.models.vae import AUTOENCODER_SIZES, Autoencoder, AutoencoderConfig, kl_per_image
from flowmill.run_dir import RunDir
from flowmill.train.config import Config
from flowmill.train.distributed import DistEnv
from flowmill.train.evaluation import Totals, alone, eval_chunks
from flowmill.train.images import image_grid, save_images
from flowmill.train.tasks.base import Task
from flowmill.train.video_metrics import psnr_per_clip

FAMILY = "autoencoder"
RECONSTRUCTION_LOSSES = ("l1", "mse")
IMAGE_CHANNELS = (1, 3)  # grey or RGB, what ImageTextDecoder reads
GRID_COLUMNS = 16  # images per row of a reconstruction grid


@dataclass
class AutoencoderModelConfig(AutoencoderConfig):
    """The autoencoder's architecture, optionally from a preset size."""

    presets: ClassVar[dict[str, AutoencoderConfig]] = AUTOENCODER_SIZES
    size: str | None = None  # a preset from AUTOENCODER_SIZES (tiny, sd3); fields given beside it override it

    def architecture(self) -> AutoencoderConfig:
        """The plain AutoencoderConfig: what defines the model's function and its weights."""
        return AutoencoderConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(AutoencoderConfig)})


@dataclass
class VAELossConfig:
    kl_weight: float = 1e-6  # weight of the KL to N(0, I) (nats summed over latents, per pixel value); LDM/SD: 1e-6
    reconstruction: str = "l1"  # reconstruction term, mean over pixels: l1 (LDM/SD's) | mse
    image_field: str = "png"  # WebDataset field holding the image (png or jpg)


@dataclass(frozen=True)
class AutoencoderRunConfig(Config):
    task: str = "autoencoder"
    model: AutoencoderModelConfig = field(default_factory=AutoencoderModelConfig)
    vae: VAELossConfig = field(default_factory=VAELossConfig)


def reconstruction_error(reconstruction: torch.Tensor, images: torch.Tensor, kind: str) -> torch.Tensor:
    """Per image (B,): mean absolute (``l1``) or squared (``mse``) error over its pixel values, in fp32."""
    difference = reconstruction.float() - images.float()
    error = difference.abs() if kind == "l1" else difference.pow(2)
    return error.flatten(1).mean(dim=1)


def comparison_grid(originals: torch.Tensor, reconstructions: torch.Tensor, cols: int = GRID_COLUMNS):
    """A grid (PIL image) of images (N, C, H, W) in [-1, 1]: each row of ``cols`` originals above a row of
    their reconstructions."""
    count = len(originals)
    cols = max(1, min(cols, count))
    blank = torch.ones_like(originals[:1])  # white, filling the last pair of rows
    rows = []
    for start in range(0, count, cols):
        for images in (originals, reconstructions):
            part = images[start: start + cols].float().clamp(-1, 1)
            rows.append(torch.cat([part, blank.expand(cols - len(part), -1, -1, -1)]))
    return image_grid(torch.cat(rows), cols=cols, upscale=2)


class AutoencoderTask(Task):
    config_class = AutoencoderRunConfig
    family = FAMILY
    cfg: AutoencoderRunConfig

    @classmethod
    def validate_config(cls, cfg: AutoencoderRunConfig) -> None:
        m = cfg.model
        if m.in_channels not in IMAGE_CHANNELS:
            raise UsageError(f"model.in_channels: images are grey (1) or RGB (3), got {m.in_channels}")
        if m.out_channels != m.in_channels:
            raise UsageError(f"model.out_channels: an autoencoder reconstructs its input; set it to model.in_channels="
                              f"{m.in_channels}, got {m.out_channels}")
        if not m.block_out_channels:
            raise UsageError("model.block_out_channels: needs at least one block")
        uneven = [width for width in m.block_out_channels if width % m.norm_num_groups]
        if uneven:
            raise UsageError(f"model.norm_num_groups: {m.norm_num_groups} groups do not divide block_out_channels {uneven}")
        if m.sample_size % m.downsample:
            raise UsageError(f"model.sample_size: {m.sample_size} px is not a multiple of the autoencoder's downsampling "
                              f"{m.downsample} (2 ** (len(block_out_channels) - 1))")
        if cfg.vae.reconstruction not in RECONSTRUCTION_LOSSES:
            raise UsageError(f"vae.reconstruction: {cfg.vae.reconstruction!r} is not one of {', '.join(RECONSTRUCTION_LOSSES)}")
        if cfg.vae.kl_weight < 0:
            raise UsageError(f"vae.kl_weight: must be >= 0, got {cfg.vae.kl_weight}")
        if cfg.vae.image_field.endswith("npy"):
            raise UsageError(f"vae.image_field: an autoencoder learns from images (png or jpg), got {cfg.vae.image_field!r}")
        if cfg.sample.prompts:
            raise UsageError("sample.prompts: an autoencoder reconstructs images and takes no prompts; remove them")
        if cfg.parallel.pipeline_stages > 1:
            raise UsageError("parallel.pipeline_stages: the autoencoder trains without pipeline stages (ZeRO 0-3); set it to 1")
        if cfg.parallel.activation_checkpointing:
            raise UsageError("parallel.activation_checkpointing: the autoencoder has no transformer blocks to checkpoint; "
                              "set it to false")

    def __init__(self, cfg: AutoencoderRunConfig, env: DistEnv, run_dir: RunDir):
        super().__init__(cfg, env, run_dir)
        self._val_images: torch.Tensor | None = None

    def build_model(self) -> nn.Module:
        return Autoencoder(self.cfg.model.architecture())

    def decoder(self) -> ImageTextDecoder:
        m = self.cfg.model
        return ImageTextDecoder(image_field=self.cfg.vae.image_field, channels=m.in_channels, size=m.sample_size)

    def objective(self, reconstruction: torch.Tensor, images: torch.Tensor, mean: torch.Tensor,
                  logvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per image (B,): the loss, its reconstruction term and the KL (nats)."""
        rec = reconstruction_error(reconstruction, images, self.cfg.vae.reconstruction)
        kl = kl_per_image(mean, logvar)
        return rec + self.cfg.vae.kl_weight * kl / images[0].numel(), rec, kl

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        images = batch["img"].to(self.env.device)
        noise = torch.randn(self.noise_shape(images), generator=generator).to(self.env.device)
        reconstruction, mean, logvar = model(images, noise)
        loss, rec, kl = self.objective(reconstruction, images, mean, logvar)
        return loss.mean(), {"train/rec_loss": rec.mean().detach(), "train/kl": kl.mean().detach()}

    def noise_shape(self, images: torch.Tensor) -> tuple[int, int, int, int]:
        """The shape of z (B, latent_channels, H / downsample, W / downsample) for images (B, C, H, W)."""
        batch, _, height, width = images.shape
        side = self.cfg.model.downsample
        return (batch, self.cfg.model.latent_channels, height // side, width // side)

    def validation_images(self) -> torch.Tensor:
        """The fixed held-out images (N, C, H, W): the first eval.num_samples of eval.path (default data.path)."""
        if self._val_images is None:
            self._val_images = self.first_batch(self.cfg.eval.path or self.cfg.data.path, self.cfg.eval.num_samples)["img"]
        return self._val_images

    @torch.no_grad()
    def reconstruct(self, model: Autoencoder, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) decoded from their posterior mean (zero noise): (reconstruction, mean, logvar) on the CPU."""
        device = next(model.parameters()).device
        part = images.to(device)
        reconstruction, mean, logvar = model(part, torch.zeros(self.noise_shape(part), device=device))
        return reconstruction.float().cpu(), mean.float().cpu(), logvar.float().cpu()

    def scores(self, model: Autoencoder, images: torch.Tensor, env: DistEnv) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """``val/psnr``, ``val/rec_loss``, ``val/kl`` over ``images`` (each rank of ``env`` scores its share, in passes of
        trainer.micro_batch_size), and this rank's reconstructions (n, C, H, W) and their PSNRs (n,)."""
        totals = Totals(["val/psnr", "val/rec_loss", "val/kl"])
        kept, psnrs = [images[:0].float()], [torch.zeros(0, dtype=torch.float64)]
        for chunk in eval_chunks(len(images), self.cfg.trainer.micro_batch_size, env):
            part = images[chunk.rows]
            reconstruction, mean, logvar = self.reconstruct(model, part)
            _, rec, kl = self.objective(reconstruction, part, mean, logvar)
            psnr = psnr_per_clip(reconstruction, part).double()
            kept.append(reconstruction)
            psnrs.append(psnr)
            totals.add("val/psnr", psnr.sum(), len(part))
            totals.add("val/rec_loss", rec.double().sum(), len(part))
            totals.add("val/kl", kl.double().sum(), len(part))
        return totals.reduced(env), torch.cat(kept), torch.cat(psnrs)

    def evaluate(self, model: nn.Module, step: int) -> dict:
        return self.scores(model, self.validation_images(), self.env)[0]

    def log_samples(self, model: nn.Module, step: int, out_dir: Path) -> list[Path]:
        """``recon-{step}.png``: the first sample.num_per_prompt held-out images above their reconstructions."""
        originals = self.validation_images()[: self.cfg.sample.num_per_prompt]
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"recon-{step:08d}.png"
        comparison_grid(originals, self.reconstruct(model, originals)[0]).save(path)
        return [path]

    def sample_command(self, model: nn.Module, source: Path, args: argparse.Namespace) -> int:
        raise UsageError(f"{source} is an autoencoder: it reconstructs images instead of sampling; use "
                          f"`flowmill reconstruct {self.run_dir} --out DIR` (held-out images and their PSNR)")

    # ----- flowmill reconstruct --------------------------------------------------------------

    def read_input(self, path: Path) -> torch.Tensor:
        """An image file → (C, H, W) in [-1, 1] of the model's channels and size."""
        if not path.is_file():
            raise UsageError(f"{path}: no such file")
        m = self.cfg.model
        try:
            pixels = image_uint8(path.read_bytes(), m.in_channels)
        except Exception as error:  # PIL raises many types for an unreadable file
            raise UsageError(f"{path}: not a readable image ({type(error).__name__}: {error})") from None
        if pixels.shape[1:] != (m.sample_size, m.sample_size):
            raise UsageError(f"{path}: image is {pixels.shape[2]}×{pixels.shape[1]} px; the autoencoder was trained on "
                              f"{m.sample_size}×{m.sample_size}")
        return pixels.float() / 127.5 - 1.0

    def reconstruct_command(self, model: Autoencoder, source: Path, args: argparse.Namespace) -> int:
        """Reconstructions (from the posterior mean) of INPUT images, or of held-out images without INPUT:
        one PNG each, grid.png (originals above reconstructions) and reconstructions.jsonl (PSNR per image)."""
        if args.num_tokens is not None or args.fit is not None:
            raise UsageError("--num-tokens, --fit: only a video tokenizer run takes them; an autoencoder reconstructs "
                              "images of its size from their posterior mean")
        inputs = [Path(name) for name in args.inputs]
        if inputs:
            stems = [path.stem for path in inputs]
            if len(set(stems)) != len(stems):
                raise UsageError(f"inputs share a file name ({', '.join(sorted({s for s in stems if stems.count(s) > 1}))}); "
                                  "each writes <name>.png into --out")
            images = torch.stack([self.read_input(path) for path in inputs])  # every input checked before any work
            names, origin = [f"{stem}.png" for stem in stems], f"{len(inputs)} input image(s)"
        else:
            count = self.cfg.eval.num_samples if args.num_samples is None else args.num_samples
            if count < 1:
                raise UsageError(f"--num-samples: must be at least 1, got {count}")
            data = args.data or self.cfg.eval.path or self.cfg.data.path
            try:
                images = self.first_batch(data, count)["img"]
            except (FileNotFoundError, ValueError) as error:
                raise UsageError(f"--data: cannot read images from {data}: {error}") from None
            names, origin = [f"{index:05d}.png" for index in range(len(images))], f"the first {len(images)} images of {data}"
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        metrics, reconstructions, psnr = self.scores(model, images, alone(self.env))
        save_images(reconstructions.clamp(-1, 1), [out / name for name in names])
        comparison_grid(images, reconstructions).save(out / "grid.png")
        with open(out / "reconstructions.jsonl", "w") as handle:
            for name, value in zip(names, psnr.tolist()):
                handle.write(json.dumps({"file": name, "psnr": value}) + "\n")
        print(f"reconstructed {origin} with {source} into {out} (grid: {out / 'grid.png'})")
        print(f"PSNR {metrics['val/psnr']:.2f} dB (pixels in [0, 1], mean over images); "
              f"{self.cfg.vae.reconstruction} {metrics['val/rec_loss']:.5f}; KL {metrics['val/kl']:.1f} nats per image")
        return 0
