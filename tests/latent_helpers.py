"""Helpers for the latent tests: a tiny randomly initialised VAE saved as a diffusers folder, and digits encoded by it."""

from __future__ import annotations

from pathlib import Path

import torch

from flowmill.data.encode import encode_dataset, load_encoder
from flowmill.data.latents import VAE_ENCODER
from flowmill.data.pack import PackOptions
from flowmill.models.vae import Autoencoder, AutoencoderConfig, LatentSpace

# 32x32 grey digits → 8x8x4 latents, like configs/vae_digits.yaml, at a width a test runs in a blink.
TINY_VAE = AutoencoderConfig(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8, 8, 8),
                             norm_num_groups=4, mid_block_add_attention=False)


def random_vae(folder: Path, scaling_factor: float | None = None, shift_factor: float | None = None, seed: int = 0,
               **overrides) -> Path:
    """A randomly initialised AutoencoderKL (``TINY_VAE`` with ``overrides``) saved as a diffusers folder."""
    torch.manual_seed(seed)
    config = AutoencoderConfig(**{**TINY_VAE.__dict__, **overrides})
    return LatentSpace(Autoencoder(config).vae, scaling_factor, shift_factor, str(folder)).save(folder)


def encode_digits(digits_dir: Path, vae: Path, out: Path, processes: int = 1) -> dict:
    """The digits encoded by ``vae`` into ``out`` (keeping txt and cls), as `flowmill data encode --vae` does."""
    kwargs = {"vae": str(vae), "image_field": "png", "size": 32}
    return encode_dataset(digits_dir, out, load_encoder(VAE_ENCODER, kwargs), encoder_spec=VAE_ENCODER,
                          encoder_args=kwargs, keep=("txt", "cls"), batch_size=256, processes=processes,
                          options=PackOptions(progress=False))
