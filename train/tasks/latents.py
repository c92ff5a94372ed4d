"""Latent flow matching for the MMDiT task: learning the flow of a VAE's latents, as SD3 does.

A run is latent when its ``data.path`` is a latent dataset (``flowmill data encode DATASET OUT
--vae VAE``: the manifest's ``latents`` section names the VAE and its scale). The MMDiT then
learns ``x0 = scale(mean + std · eps)``, a fresh draw from the VAE posterior at every step
(``flow.latents: sample``, the default), or ``scale(mean)`` (``flow.latents: mean``). Sampling is
the default, as in diffusers' SD3 training script (``latent_dist.sample()``): the decoder was
trained on posterior samples, so they are the latents it decodes well, and the draw is free data
augmentation. ``eps`` comes from the task's generator, so an exact resume draws the same latents.
Evaluation uses the scaled mean (fixed, like its noise). Samples are decoded through the VAE,
whose weights must be those that encoded the data (sha256).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flowmill.data import decode
from flowmill.data.decode import class_id, npy_array
from flowmill.data.latents import MEAN_FIELD, STD_FIELD, latent_space, latents_section
from flowmill.data.remote import Storage
from flowmill.errors import UsageError
from flowmill.models.vae import LatentSpace
from flowmill.run_dir import RunDir

LATENT_DRAWS = ("sample", "mean")  # flow.latents
LATENT_FIELDS = (MEAN_FIELD, STD_FIELD)


@dataclass
class LatentDecoder:
    """Decode latent samples: ``{"img": the posterior mean float (C, H, W), "img_std": its std, "txt": str}``
    plus ``"cls": int`` when the sample has a ``.cls`` field. Unscaled: the task scales them."""

    channels: int  # C, latent channels
    size: int  # H = W, latent side

    def __call__(self, sample: dict) -> dict:
        mean = npy_array(decode.field(sample, MEAN_FIELD))
        std = npy_array(decode.field(sample, STD_FIELD))
        expected = (self.channels, self.size, self.size)
        if mean.shape != expected or std.shape != expected:
            raise ValueError(f"latents are mean {mean.shape}, std {std.shape}; expected {expected}")
        out = {"img": torch.from_numpy(mean.astype(np.float32)), "img_std": torch.from_numpy(std.astype(np.float32)),
               "txt": decode.text(decode.field(sample, "txt"))}
        if "cls" in sample:
            out["cls"] = class_id(sample["cls"])
        return out


class Latents:
    """The latent side of an MMDiT: how training draws ``x0`` and how samples become images."""

    def __init__(self, space: LatentSpace, draw: str = "sample"):
        self.space = space
        self.draw = draw

    @property
    def channels(self) -> int:
        return self.space.latent_channels

    def to(self, device: torch.device) -> Latents:
        self.space.to(device)
        return self

    def x0(self, batch: dict, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """Scaled training latents (B, C, H, W): a posterior draw (``eps`` from ``generator``) or the mean."""
        mean = batch["img"]
        if self.draw == "sample":
            mean = mean + batch["img_std"] * torch.randn(mean.shape, generator=generator)
        return self.space.scale(mean.to(device))

    def fixed_x0(self, batch: dict, device: torch.device) -> torch.Tensor:
        """Scaled posterior means (B, C, H, W): the fixed latents evaluation scores."""
        return self.space.scale(batch["img"].to(device))

    def images(self, latents: torch.Tensor) -> torch.Tensor:
        """Generated scaled latents (B, C, H, W) → images (B, C', H', W') in [-1, 1], decoded by the VAE."""
        return self.space.decode(latents).float().clamp(-1, 1)


def _section(source: str, storage: Storage) -> dict | None:
    try:
        return latents_section(source, storage)
    except (FileNotFoundError, ValueError):  # a glob or pattern without a manifest: not a latent dataset
        return None


def run_latents(cfg, run_dir: RunDir, device: torch.device) -> Latents | None:
    """The latents of an MMDiT run config (None: a pixel run), checked before training.

    UsageError, naming the key, for latents whose shape does not fit ``model.*``, a latent config
    (``flow.vae``, ``flow.image_field`` naming a latent field) on a dataset without a ``latents``
    section, held-out data encoded by another VAE, and a VAE whose weights differ from the
    manifest's. A run whose dataset is gone samples with its saved copy of the section.
    """
    path = str(cfg.data.path)
    section = _section(path, cfg.data.storage())
    if section is None and not Path(path).exists() and run_dir.latents.is_file():
        section = json.loads(run_dir.latents.read_text())
    if section is None:
        for key, wants in (("flow.vae", cfg.flow.vae is not None), ("flow.image_field", cfg.flow.image_field in LATENT_FIELDS)):
            if wants:
                raise UsageError(f"{key}: {path} has no VAE fields (its manifest has no 'latents' section); encode the "
                                 f"images with `flowmill data encode {path} OUT --vae VAE` and set data.path=OUT")
        return None
    where = f"{path}/manifest.json"
    channels, height, width = section["shape"]
    for key, value, wanted in (("model.in_channels", cfg.model.in_channels, channels),
                               ("model.out_channels", cfg.model.out_channels, channels),
                               ("model.sample_size", cfg.model.sample_size, height)):
        if value != wanted:
            raise UsageError(f"{key}: is {value}, but the latents of {where} are {channels}x{height}x{width}; set {key}={wanted}")
    if cfg.eval.path and str(cfg.eval.path) != path:
        held_out = _section(str(cfg.eval.path), cfg.data.storage())
        if held_out is None or held_out["vae_sha256"] != section["vae_sha256"]:
            raise UsageError(f"eval.path: {cfg.eval.path} is not encoded by the VAE of {where} ({section['vae']}); "
                             "encode the held-out images with the same --vae")
    try:
        space = latent_space(section, cfg.flow.vae)
    except (UsageError, ValueError) as error:
        raise UsageError(f"{'flow.vae' if cfg.flow.vae else 'data.path'}: {error}") from None
    return Latents(space, cfg.flow.latents).to(device)


def save_section(source: str, run_dir: RunDir, storage: Storage) -> None:
    """Keep the dataset's ``latents`` section in the run dir (rank 0, once per run); a remote dataset is read with ``storage``."""
    section = _section(source, storage)
    if section is not None and not run_dir.latents.exists():
        run_dir.latents.write_text(json.dumps(section, indent=1) + "\n")
