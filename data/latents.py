"""Latent datasets: images encoded once by a frozen VAE (``flowmill data encode DATASET OUT --vae VAE``).

Each sample holds the VAE posterior's unscaled mean and standard deviation, ``latent_mean.npy``
and ``latent_std.npy`` (float (C, H, W)), and a copy of the caption ``txt`` and class ``cls``.
Storing the distribution rather than one latent lets training draw a fresh latent
``mean + std · eps`` every epoch (what diffusers' SD3 training script does with
``latent_dist.sample()``) or use the mean.

The manifest's ``latents`` section names the VAE and the convention a flow model learns,
``latent = (z - shift_factor) · scaling_factor``::

    "latents": {"vae": PATH, "vae_sha256": ..., "scaling_factor": ..., "shift_factor": ...,
                "measured": ["scaling_factor", "shift_factor"], "shape": [C, H, W],
                "mean_field": "latent_mean.npy", "std_field": "latent_std.npy",
                "statistics": {"mean": ..., "std": ...}}

When the VAE has no ``scaling_factor`` it is measured on the data: 1 / std of the latents
(and ``shift_factor`` = their mean when the VAE has no shift either), listed in ``measured``.
"The latents" are the posterior samples training draws by default: their variance is
E[mean²] + E[std²] - E[mean]², computed exactly from sums over every element, in one pass.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image

from flowmill.data.decode import IMAGE_FIELDS, field, image_uint8
from flowmill.data.remote import Storage
from flowmill.data.shards import dataset_shards, read_manifest
from flowmill.data.tario import read_samples
from flowmill.models.loading import load_vae
from flowmill.models.vae import LatentSpace

LATENTS_SECTION = "latents"
MEAN_OUTPUT, STD_OUTPUT = "latent_mean", "latent_std"  # encoder outputs; the shards' fields add .npy
MEAN_FIELD, STD_FIELD = f"{MEAN_OUTPUT}.npy", f"{STD_OUTPUT}.npy"
VAE_ENCODER = "flowmill.data.latents:vae_encoder"
DEFAULT_KEEP = ("txt", "cls")  # copied along when the source samples have them


class VaeEncoder:
    """The ``flowmill data encode`` encoder of a frozen VAE: image → posterior ``latent_mean`` and
    ``latent_std`` (C, H, W), unscaled; sums of the latents' moments for measuring the scale."""

    def __init__(self, space: LatentSpace, vae: str, image_field: str, size: int):
        if space.image_channels not in (1, 3):
            raise ValueError(f"the VAE {vae} takes {space.image_channels}-channel images; flowmill encodes grey (1) "
                             "or RGB (3) images")
        if size % space.downsample:
            raise ValueError(f"images of {size} pixels do not divide into the VAE's {space.downsample}x downsampling")
        self.space = space
        self.image_field = image_field
        self.size = size
        self.device = torch.device("cpu")
        self.description = {
            "vae": vae, "vae_sha256": space.sha256, "scaling_factor": space.scaling_factor,
            "shift_factor": space.shift_factor, "image_field": image_field, "image_size": size,
        }

    def decode(self, sample: dict) -> dict:
        image = image_uint8(field(sample, self.image_field), self.space.image_channels).float() / 127.5 - 1.0
        if image.shape[1:] != (self.size, self.size):
            raise ValueError(f"image is {tuple(image.shape[1:])}, expected ({self.size}, {self.size}) like the "
                             "dataset's first image")
        return {"image": image}

    def to(self, device: torch.device) -> VaeEncoder:
        self.space.to(device)
        self.device = device
        return self

    def __call__(self, batch: dict) -> dict[str, torch.Tensor]:
        mean, std = self.space.posterior(batch["image"].to(self.device))
        return {MEAN_OUTPUT: mean.float(), STD_OUTPUT: std.float()}

    def sums(self, outputs: dict[str, torch.Tensor]) -> np.ndarray:
        """(elements, Σ mean, Σ mean², Σ std²) of a batch's latents, float64."""
        mean, std = outputs[MEAN_OUTPUT].double(), outputs[STD_OUTPUT].double()
        return np.array([mean.numel(), mean.sum().item(), mean.pow(2).sum().item(), std.pow(2).sum().item()])

    def summary(self, total: np.ndarray) -> dict:
        """The manifest's ``latents`` section from the dataset's summed moments (see module docstring)."""
        count, first, second, variance = total
        mean = first / count
        std = math.sqrt(max((second + variance) / count - mean * mean, 0.0))
        scaling, shift, measured = self.space.scaling_factor, self.space.shift_factor, []
        if scaling is None:
            if std == 0.0:
                raise ValueError("the latents have zero variance; no scaling_factor can be measured")
            scaling, measured = 1.0 / std, ["scaling_factor"]
            if shift is None:
                shift, measured = mean, [*measured, "shift_factor"]
        return {LATENTS_SECTION: {
            "vae": self.description["vae"], "vae_sha256": self.space.sha256, "scaling_factor": scaling,
            "shift_factor": shift, "measured": measured, "shape": list(self.space.latent_shape(self.size)),
            "mean_field": MEAN_FIELD, "std_field": STD_FIELD, "statistics": {"mean": mean, "std": std},
        }}


def vae_encoder(vae: str, image_field: str, size: int) -> VaeEncoder:
    """Factory for ``flowmill data encode --vae VAE`` (see ``first_image``)."""
    return VaeEncoder(load_vae(vae), vae, image_field, size)


def first_image(source: str) -> tuple[str, int, list[str]]:
    """(image field, side, fields) of the first sample of ``source`` that holds a decodable square
    image: the field and size every image of the dataset is encoded with."""
    for shard in dataset_shards(source):
        for raw in read_samples(shard, []):
            for name in IMAGE_FIELDS:
                if name in raw:
                    with Image.open(io.BytesIO(raw[name])) as image:
                        width, height = image.size
                    if width == height:
                        return name, width, sorted(key for key in raw if not key.startswith("__"))
    raise ValueError(f"{source} holds no square image in a field {', '.join(IMAGE_FIELDS)}")


def latents_section(source: str, storage: Storage | None = None) -> dict | None:
    """The ``latents`` section of a dataset's manifest (remote: read with ``storage``); None for a dataset of something else."""
    return read_manifest(source, storage).get(LATENTS_SECTION)


def latent_space(section: dict, vae: str | None = None) -> LatentSpace:
    """The VAE of a latent dataset (``vae``, else the one its manifest names) with the dataset's factors;
    ValueError when its weights differ (sha256) from those that encoded the dataset."""
    path = vae or section["vae"]
    space = load_vae(path)
    if space.sha256 != section["vae_sha256"]:
        raise ValueError(f"the VAE {path} (weights sha256 {space.sha256[:12]}...) is not the one that encoded the "
                         f"latents ({section['vae']}, sha256 {section['vae_sha256'][:12]}...)")
    return space.with_factors(section["scaling_factor"], section["shift_factor"] or 0.0)
