"""The autoencoder of latent flow matching: diffusers' ``AutoencoderKL``, and the latent space it defines.

A latent model (Stable Diffusion 3's MMDiT) never sees pixels: it learns the flow of the VAE's
latents, shifted and scaled to roughly unit variance, ``latent = (z - shift_factor) ·
scaling_factor``. ``LatentSpace`` owns that convention in both directions, so the data encoder,
training and sampling cannot disagree on it.

A VAE is named by a local diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors``,
e.g. SD3's ``vae/``) or by a flowmill ``task: autoencoder`` run (its EMA weights). Nothing is
downloaded.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from flowmill.errors import UsageError
from flowmill.weights import weights_sha256

DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def _autoencoder_kl() -> type[nn.Module]:
    """diffusers' ``AutoencoderKL`` class, imported lazily: importing diffusers costs seconds of start-up
    that every command not building a VAE (most training runs) would pay."""
    from diffusers import AutoencoderKL

    return AutoencoderKL


@dataclass
class AutoencoderConfig:
    """The architecture of an ``AutoencoderKL`` (the diffusers keyword arguments flowmill exposes).

    The image side is ``2 ** (len(block_out_channels) - 1)`` times the latent side.
    """

    in_channels: int = 3  # image channels
    out_channels: int = 3  # reconstructed image channels (= in_channels)
    latent_channels: int = 4  # channels of z (SD3: 16)
    block_out_channels: tuple[int, ...] = (32, 64, 64)  # one encoder/decoder block each; all but the last halve the side
    layers_per_block: int = 1  # resnet layers per block
    norm_num_groups: int = 32  # GroupNorm groups (divides every block_out_channels entry)
    mid_block_add_attention: bool = True  # self-attention in the middle block (SD3: true)
    use_quant_conv: bool = True  # 1x1 conv after the encoder (SD3: false)
    use_post_quant_conv: bool = True  # 1x1 conv before the decoder (SD3: false)
    sample_size: int = 32  # image side in pixels it is trained at (the task reads only this size; informational for diffusers)
    # latent = (z - shift_factor) * scaling_factor; None: not known yet (measured when a dataset is encoded).
    scaling_factor: float | None = None
    shift_factor: float | None = None

    def diffusers_kwargs(self) -> dict:
        """Keyword arguments of ``AutoencoderKL`` for this architecture."""
        blocks = len(self.block_out_channels)
        kwargs = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        kwargs["block_out_channels"] = tuple(self.block_out_channels)
        kwargs["scaling_factor"] = 1.0 if self.scaling_factor is None else self.scaling_factor
        return {**kwargs, "down_block_types": ("DownEncoderBlock2D",) * blocks, "up_block_types": ("UpDecoderBlock2D",) * blocks}

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


# Named architectures (``model.size`` of a ``task: autoencoder`` config). Their factors stay None: the
# scale and shift belong to trained weights (SD3's are in its vae/config.json), and a newly trained
# VAE's are measured on the data it encodes.
AUTOENCODER_SIZES: dict[str, AutoencoderConfig] = {
    "tiny": AutoencoderConfig(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8, 16),
                              norm_num_groups=4, mid_block_add_attention=False, sample_size=32),
    "sd3": AutoencoderConfig(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                             layers_per_block=2, norm_num_groups=32, mid_block_add_attention=True,
                             use_quant_conv=False, use_post_quant_conv=False, sample_size=1024),
}


def autoencoder_config(name: str, **overrides) -> AutoencoderConfig:
    """The named size from ``AUTOENCODER_SIZES`` with fields replaced, e.g. ``autoencoder_config("sd3", in_channels=1)``."""
    if name not in AUTOENCODER_SIZES:
        raise ValueError(f"unknown autoencoder size {name!r}; choose one of: {', '.join(AUTOENCODER_SIZES)}")
    return dataclasses.replace(AUTOENCODER_SIZES[name], **overrides)


def kl_per_image(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) ‖ N(0, I)) of each posterior (B, C, h, w), summed over its elements: (B,) nats."""
    return 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float()).flatten(1).sum(dim=1)


class Autoencoder(nn.Module):
    """An ``AutoencoderKL`` as flowmill trains it: ``model(images, noise)`` → (reconstruction, mean, logvar).

    One forward through encoder and decoder (the reparameterised sample ``mean + std · noise``), so
    DeepSpeed's engine and ZeRO-3's parameter hooks see a single call. Built from ``config`` like
    every flowmill model (the EMA and ``load_model`` rely on ``type(model)(model.config)``).
    """

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        self.vae = _autoencoder_kl()(**config.diffusers_kwargs())

    def forward(self, images: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) in [-1, 1] and N(0, I) noise (B, latent_channels, h, w), h = H / downsample →
        the reconstruction (B, C, H, W) of ``z = mean + std · noise`` and the posterior's mean and logvar (like z)."""
        posterior = self.vae.encode(images).latent_dist
        z = posterior.mean + posterior.std * noise.to(posterior.mean.dtype)
        return self.vae.decode(z).sample, posterior.mean, posterior.logvar


class LatentSpace:
    """A frozen VAE and its latent convention: images in [-1, 1] ↔ latents ``(z - shift) · scale``."""

    def __init__(self, vae: nn.Module, scaling_factor: float | None, shift_factor: float | None, source: str):
        self.vae = vae.eval().requires_grad_(False)
        self.scaling_factor = scaling_factor
        self.shift_factor = shift_factor
        self.source = source
        self.sha256 = weights_sha256(vae.state_dict())

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def image_channels(self) -> int:
        return self.vae.config.in_channels

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        """(C, H, W) of the latents of an ``image_size``-square image."""
        side = image_size // self.downsample
        return (self.latent_channels, side, side)

    def with_factors(self, scaling_factor: float, shift_factor: float) -> LatentSpace:
        """The same VAE with the given scale and shift (e.g. measured on a dataset); the weights' hash is
        kept, not recomputed (it serializes every weight)."""
        space = copy.copy(self)
        space.scaling_factor, space.shift_factor = scaling_factor, shift_factor
        return space

    def _factors(self) -> tuple[float, float]:
        if self.scaling_factor is None:
            raise ValueError(f"the VAE {self.source} has no scaling_factor; measure it on the data "
                             "(`flowmill data encode` does) before converting latents")
        return self.scaling_factor, self.shift_factor or 0.0

    @torch.no_grad()
    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The unscaled posterior (mean, std) of images (B, C, H, W) in [-1, 1]."""
        distribution = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        return distribution.mean, distribution.std

    def scale(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents z → the latents a flow model learns."""
        scaling, shift = self._factors()
        return (z - shift) * scaling

    def unscale(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of ``scale``."""
        scaling, shift = self._factors()
        return latents / scaling + shift

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents of images in [-1, 1]: the posterior mean, or a sample when ``generator`` is given."""
        mean, std = self.posterior(images)
        if generator is not None:
            mean = mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        return self.scale(mean)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W), nominally in [-1, 1], of scaled latents."""
        return self.vae.decode(self.unscale(latents).to(self.vae.dtype)).sample

    def to(self, device: torch.device | str) -> LatentSpace:
        self.vae.to(device)
        return self

    def save(self, folder: str | Path) -> Path:
        """Write this VAE as a diffusers folder, its factors in ``config.json``."""
        folder = Path(folder)
        self.vae.save_pretrained(folder, safe_serialization=True)
        config = json.loads((folder / DIFFUSERS_CONFIG).read_text())
        config.update(scaling_factor=self.scaling_factor, shift_factor=self.shift_factor)
        (folder / DIFFUSERS_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        return folder


def is_diffusers_vae(path: str | Path) -> bool:
    return (Path(path) / DIFFUSERS_CONFIG).is_file()


def load_diffusers_vae(folder: str | Path) -> LatentSpace:
    """A diffusers ``AutoencoderKL`` folder; its ``scaling_factor``/``shift_factor`` are None when
    ``config.json`` does not state them."""
    folder = Path(folder)
    config_file, weights = folder / DIFFUSERS_CONFIG, folder / DIFFUSERS_WEIGHTS
    if not config_file.is_file():
        raise UsageError(f"{config_file} does not exist; a VAE is a diffusers AutoencoderKL folder "
                         "(config.json + diffusion_pytorch_model.safetensors) or a flowmill autoencoder run")
    if not weights.is_file():
        raise UsageError(f"{weights} does not exist; the VAE folder {folder} has no weights (save it with "
                         "AutoencoderKL.save_pretrained(folder, safe_serialization=True))")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise UsageError(f"{config_file}: not JSON ({error})") from None
    if config.get("_class_name") not in (None, "AutoencoderKL"):
        raise UsageError(f"{config_file} describes a {config['_class_name']}, not an AutoencoderKL")
    vae = _autoencoder_kl().from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False)
    return LatentSpace(vae, config.get("scaling_factor"), config.get("shift_factor"), str(folder))


def vae_from_weights(config: AutoencoderConfig, state_dict: dict[str, torch.Tensor], source: str) -> LatentSpace:
    """The latent space of a flowmill ``Autoencoder``'s weights (keys as the training model names them)."""
    model = Autoencoder(config)
    model.load_state_dict(state_dict)
    return LatentSpace(model.vae, config.scaling_factor, config.shift_factor, source)
