"""flowmill's VAE is diffusers' AutoencoderKL: a diffusers folder with SD3's VAE configuration encodes and
decodes through ``load_vae`` exactly as diffusers does, and ``LatentSpace`` keeps the latent convention."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import AutoencoderKL

from flowmill.models.loading import load_vae
from flowmill.models.vae import (
    AUTOENCODER_SIZES,
    Autoencoder,
    AutoencoderConfig,
    LatentSpace,
    autoencoder_config,
    kl_per_image,
    vae_from_weights,
)

torch.set_num_threads(1)

# Stable Diffusion 3's vae/config.json (stable-diffusion-3-medium-diffusers), as diffusers reads it.
SD3_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
               layers_per_block=2, norm_num_groups=32, act_fn="silu", sample_size=1024, force_upcast=True,
               use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609)
SCALE, SHIFT = SD3_VAE["scaling_factor"], SD3_VAE["shift_factor"]
TINY = AutoencoderConfig(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
                         mid_block_add_attention=False, sample_size=16)


def randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``model`` with every parameter moved off its initial value (norms' ones and zeros included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    return model.eval()


def images(count: int, channels: int, side: int, seed: int = 1) -> torch.Tensor:
    return torch.rand((count, channels, side, side), generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.fixture(scope="module")
def sd3_vae(tmp_path_factory) -> tuple[AutoencoderKL, LatentSpace]:
    """A randomly initialised AutoencoderKL of SD3's full VAE configuration, saved by diffusers and loaded by flowmill."""
    torch.manual_seed(0)
    theirs = randomised(AutoencoderKL(**SD3_VAE))
    folder = tmp_path_factory.mktemp("sd3") / "vae"
    theirs.save_pretrained(folder, safe_serialization=True)
    return theirs, load_vae(folder)


def test_sd3_vae_folder_encodes_and_decodes_as_diffusers(sd3_vae):
    theirs, ours = sd3_vae
    assert (ours.scaling_factor, ours.shift_factor) == (SCALE, SHIFT)
    assert ours.latent_channels == 16 and ours.downsample == 8 and ours.latent_shape(64) == (16, 8, 8)
    x = images(2, 3, 64)
    with torch.no_grad():
        expected = (theirs.encode(x).latent_dist.mean - SHIFT) * SCALE
        latents = ours.encode(x)
        assert latents.shape == (2, 16, 8, 8)
        torch.testing.assert_close(latents, expected, atol=1e-5, rtol=0)
        decoded = theirs.decode(latents / SCALE + SHIFT).sample
        torch.testing.assert_close(ours.decode(latents), decoded, atol=1e-5, rtol=0)
    assert decoded.shape == (2, 3, 64, 64)


def test_the_sd3_preset_is_sd3s_architecture(sd3_vae):
    theirs, _ = sd3_vae
    ours = Autoencoder(AUTOENCODER_SIZES["sd3"]).vae
    assert {name: tuple(p.shape) for name, p in ours.state_dict().items()} == \
        {name: tuple(p.shape) for name, p in theirs.state_dict().items()}
    assert AUTOENCODER_SIZES["sd3"].downsample == 8
    assert autoencoder_config("sd3", in_channels=1).in_channels == 1
    with pytest.raises(ValueError, match="unknown autoencoder size 'sd4'; choose one of: tiny, sd3"):
        autoencoder_config("sd4")


@pytest.fixture
def tiny_space() -> LatentSpace:
    torch.manual_seed(0)
    model = randomised(Autoencoder(TINY))
    return LatentSpace(model.vae, scaling_factor=0.7, shift_factor=0.2, source="tiny")


def test_scale_and_unscale_are_inverse(tiny_space):
    z = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(tiny_space.unscale(tiny_space.scale(z)), z, atol=1e-12, rtol=0)
    torch.testing.assert_close(tiny_space.scale(z), (z - 0.2) * 0.7)
    no_shift = tiny_space.with_factors(2.0, None)
    torch.testing.assert_close(no_shift.scale(z), z * 2.0)


def test_encode_gives_the_posterior_mean_or_a_seeded_sample(tiny_space):
    x = images(3, 1, 16)
    mean, std = tiny_space.posterior(x)
    assert mean.shape == std.shape == (3, 4, 8, 8)
    torch.testing.assert_close(tiny_space.encode(x), (mean - 0.2) * 0.7)
    sample = tiny_space.encode(x, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(sample, (mean + std * noise - 0.2) * 0.7)
    assert not torch.allclose(sample, tiny_space.encode(x))
    torch.testing.assert_close(tiny_space.encode(x, generator=torch.Generator().manual_seed(5)), sample)


def test_a_vae_without_scaling_factor_refuses_to_convert_latents(tiny_space):
    unknown = LatentSpace(tiny_space.vae, None, None, source="runs/vae")
    with pytest.raises(ValueError, match="the VAE runs/vae has no scaling_factor; measure it on the data"):
        unknown.encode(images(1, 1, 16))
    with pytest.raises(ValueError, match="has no scaling_factor"):
        unknown.decode(torch.zeros(1, 4, 8, 8))
    mean, _ = unknown.posterior(images(1, 1, 16))  # the unscaled posterior needs no factor (it is how one is measured)
    torch.testing.assert_close(unknown.with_factors(0.5, 0.0).encode(images(1, 1, 16)), mean * 0.5)


def test_saved_latent_space_loads_with_its_factors(tiny_space, tmp_path):
    loaded = load_vae(tiny_space.save(tmp_path / "vae"))
    assert (loaded.scaling_factor, loaded.shift_factor) == (0.7, 0.2)
    assert loaded.sha256 == tiny_space.sha256
    x = images(2, 1, 16)
    torch.testing.assert_close(loaded.encode(x), tiny_space.encode(x), atol=0, rtol=0)


def test_training_wrapper_and_weights_give_the_same_vae():
    torch.manual_seed(0)
    model = randomised(Autoencoder(dataclasses.replace(TINY, scaling_factor=0.5, shift_factor=0.1)))
    x = images(2, 1, 16)
    with torch.no_grad():
        reconstruction, mean, logvar = model(x, torch.zeros(2, 4, 8, 8))
    space = vae_from_weights(model.config, model.state_dict(), "weights")
    assert (space.scaling_factor, space.shift_factor) == (0.5, 0.1)
    torch.testing.assert_close(space.encode(x), (mean - 0.1) * 0.5)
    torch.testing.assert_close(space.decode(space.encode(x)), reconstruction, atol=1e-5, rtol=0)
    # The reparameterised draw is mean + std · noise.
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        drawn = model(x, noise)[0]
        expected = model.vae.decode(mean + (0.5 * logvar).exp() * noise).sample
    torch.testing.assert_close(drawn, expected, atol=1e-5, rtol=0)


def test_kl_per_image_is_zero_at_the_prior_and_sums_over_latents():
    mean, logvar = torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)
    assert torch.equal(kl_per_image(mean, logvar), torch.zeros(2))
    mean[1] = 1.0  # KL of N(1, 1) to N(0, 1) is 1/2 per element
    torch.testing.assert_close(kl_per_image(mean, logvar), torch.tensor([0.0, 0.5 * 36]))
