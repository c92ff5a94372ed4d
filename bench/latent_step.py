"""Step time per image: the digits MMDiT on 32×32×1 pixels vs on 8×8×4 VAE latents, and the VAE's cost.

For the model section of the pixel config (configs/mmdit_digits.yaml) and of the latent config
(configs/mmdit_digits_latent.yaml), a flowmill MMDiT with random weights runs, on the same batch
size, forward + backward of an MSE loss (a training step without the optimizer, whose cost
follows the parameter count, which the two models share) and a forward alone (one network call
of sampling). Repetitions are interleaved (the order alternates) so load from other processes
hits every model alike; medians are printed as milliseconds per image, side by side.

The VAE of configs/vae_digits.yaml (random weights: only its architecture matters for time)
encodes the images once, before latent training (``flowmill data encode``), and decodes each
latent sample once; both are printed per image, with what a sample costs end to end: ``2 ·
steps`` forward passes (classifier-free guidance), plus one decode for the latent model.

A config file that is missing is replaced by a provisional section (printed as such): the
latent MMDiT is the pixel one with 4 input/output channels at side 8, timed at patch 2
(16 tokens, SD3's choice for latents) and patch 1 (64 tokens, as many as the pixel model's
patch 4); the VAE is ``AutoencoderConfig``'s default with 1 image channel (32 → 8, 4 latent
channels).

Run: ``.venv/bin/python bench/latent_step.py`` (about a minute). ``--threads`` sets torch's
intra-op threads (default 1: steadier numbers on a shared machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from diffusers import AutoencoderKL

from flowmill.models.mmdit import MMDIT_SIZES, MMDiT, MMDiTConfig
from flowmill.models.vae import AutoencoderConfig, LatentSpace

TEXT_TOKENS = 8  # configs/mmdit_digits.yaml's text.max_length, used when a config has no text section
PROVISIONAL_VAE = dict(in_channels=1, out_channels=1, latent_channels=4, sample_size=32)


def timed(fn) -> float:
    """Wall seconds of one call."""
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def interleaved(steps: dict, reps: int) -> dict[str, list[float]]:
    """Wall seconds of each named step over ``reps`` rounds, the order reversed every other round."""
    names = list(steps)
    times = {name: [] for name in names}
    for rep in range(reps):
        for name in names if rep % 2 == 0 else reversed(names):
            times[name].append(timed(steps[name]))
    return times


def read_sections(path: str) -> dict | None:
    """The YAML config's sections, or None where the file does not exist."""
    file = Path(path)
    return yaml.safe_load(file.read_text()) if file.is_file() else None


def mmdit_config(section: dict) -> MMDiTConfig:
    """The MMDiTConfig of a config's ``model`` section (a ``size`` preset expanded, run-only keys dropped)."""
    preset = dataclasses.asdict(MMDIT_SIZES[section["size"]]) if section.get("size") else {}
    names = {f.name for f in dataclasses.fields(MMDiTConfig)}
    return MMDiTConfig(**{**preset, **{key: value for key, value in section.items() if key in names}})


def latent_models(pixel: MMDiTConfig, sections: dict | None) -> dict[str, MMDiTConfig]:
    """Named latent MMDiTs: the latent config's, or the provisional ones when it is missing."""
    if sections is not None:
        return {"latent": mmdit_config(sections["model"])}
    side = 8
    return {f"latent, patch {patch} (provisional)": dataclasses.replace(
        pixel, in_channels=4, out_channels=4, sample_size=side, patch_size=patch, pos_embed_max_size=side // patch)
        for patch in (2, 1)}


def vae_config(sections: dict | None) -> AutoencoderConfig:
    section = sections["model"] if sections is not None else PROVISIONAL_VAE
    names = {f.name for f in dataclasses.fields(AutoencoderConfig)}
    values = {key: value for key, value in section.items() if key in names}
    if "block_out_channels" in values:
        values["block_out_channels"] = tuple(values["block_out_channels"])
    return AutoencoderConfig(**values)


def model_steps(name: str, config: MMDiTConfig, batch: int, text_tokens: int) -> tuple[dict, dict]:
    """(fwd+bwd and fwd step functions keyed ``name: fwd+bwd`` / ``name: fwd``, facts about the model)."""
    torch.manual_seed(0)
    model = MMDiT(config).train()
    generator = torch.Generator().manual_seed(1)
    side, channels = config.sample_size, config.in_channels
    img = torch.randn(batch, channels, side, side, generator=generator)
    t = torch.rand(batch, generator=generator)
    txt = torch.randn(batch, text_tokens, config.txt_dim, generator=generator)
    vec = torch.randn(batch, config.vec_dim, generator=generator)
    target = torch.randn(batch, config.out_channels, side, side, generator=generator)

    def train_step():
        model.zero_grad(set_to_none=True)
        F.mse_loss(model(img, t, txt, vec), target).backward()

    def forward():
        with torch.no_grad():
            model(img, t, txt, vec)

    facts = {"shape": [channels, side, side], "tokens": (side // config.patch_size) ** 2, "patch_size": config.patch_size,
             "params": sum(p.numel() for p in model.parameters())}
    return {f"{name}: fwd+bwd": train_step, f"{name}: fwd": forward}, facts


def vae_steps(config: AutoencoderConfig, batch: int) -> dict:
    """Encode (posterior mean and std) and decode step functions of a random-weight VAE."""
    torch.manual_seed(0)
    space = LatentSpace(AutoencoderKL(**config.diffusers_kwargs()), 1.0, 0.0, "random weights")
    generator = torch.Generator().manual_seed(2)
    images = torch.rand(batch, config.in_channels, config.sample_size, config.sample_size, generator=generator) * 2 - 1
    latents = space.encode(images)
    return {"vae: encode": lambda: space.encode(images), "vae: decode": lambda: space.decode(latents)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pixel-config", default="configs/mmdit_digits.yaml")
    parser.add_argument("--latent-config", default="configs/mmdit_digits_latent.yaml")
    parser.add_argument("--vae-config", default="configs/vae_digits.yaml")
    parser.add_argument("--batch", type=int, default=32, help="images per step, every model (default 32, the digits micro-batch)")
    parser.add_argument("--reps", type=int, default=20, help="interleaved repetitions (default 20)")
    parser.add_argument("--sample-steps", type=int, default=25, help="sampler steps for the per-sample cost (default 25)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON line")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    pixel_sections = read_sections(args.pixel_config)
    if pixel_sections is None:
        parser.error(f"--pixel-config: {args.pixel_config} does not exist")
    latent_sections, vae_sections = read_sections(args.latent_config), read_sections(args.vae_config)
    pixel = mmdit_config(pixel_sections["model"])
    models = {"pixel": pixel, **latent_models(pixel, latent_sections)}
    steps, facts = {}, {}
    for name, config in models.items():
        sections = pixel_sections if name == "pixel" else latent_sections or pixel_sections
        text_tokens = (sections.get("text") or {}).get("max_length", TEXT_TOKENS)
        model_step, facts[name] = model_steps(name, config, args.batch, text_tokens)
        steps.update(model_step)
    vae = vae_config(vae_sections)
    steps.update(vae_steps(vae, args.batch))
    for step in steps.values():
        step()
        step()
    times = interleaved(steps, args.reps)
    per_image_ms = {key: 1e3 * statistics.median(value) / args.batch for key, value in times.items()}

    load = os.getloadavg()
    print(f"batch {args.batch}, {args.reps} interleaved repetitions, {args.threads} thread(s); "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if latent_sections is None:
        print(f"{args.latent_config} not found: provisional latent models (the pixel model's section at 8x8x4)")
    if vae_sections is None:
        print(f"{args.vae_config} not found: provisional VAE {PROVISIONAL_VAE} on AutoencoderConfig's defaults")
    print(f"\n{'model':<32}{'input':>10}{'tokens':>8}{'params':>9}{'fwd+bwd ms/img':>16}{'fwd ms/img':>12}"
          f"{'vs pixel':>10}{'sample ms/img':>15}")
    decode = per_image_ms["vae: decode"]
    rows = {}
    for name in models:
        train, forward = per_image_ms[f"{name}: fwd+bwd"], per_image_ms[f"{name}: fwd"]
        sample = 2 * args.sample_steps * forward + (0.0 if name == "pixel" else decode)
        rows[name] = {**facts[name], "fwd_bwd_ms_per_image": train, "fwd_ms_per_image": forward,
                      "vs_pixel": train / per_image_ms["pixel: fwd+bwd"], "sample_ms_per_image": sample}
        shape = "x".join(str(size) for size in facts[name]["shape"][::-1])
        print(f"{name:<32}{shape:>10}{facts[name]['tokens']:>8}{facts[name]['params'] / 1e6:>8.2f}M"
              f"{train:>16.3f}{forward:>12.3f}{rows[name]['vs_pixel']:>9.2f}x{sample:>15.1f}")
    print(f"\nVAE ({'x'.join(map(str, vae.block_out_channels))} channels, {vae.latent_channels} latent channels): "
          f"encode {per_image_ms['vae: encode']:.3f} ms/image (once per dataset image, before training), "
          f"decode {decode:.3f} ms/image (once per latent sample)")
    print(f"sample ms/img: {args.sample_steps} Euler steps x 2 forward passes (CFG), plus the decode for a latent model")
    if args.json:
        print(json.dumps({"batch": args.batch, "threads": args.threads, "models": rows,
                          "vae": {"encode_ms_per_image": per_image_ms["vae: encode"], "decode_ms_per_image": decode,
                                  "provisional": vae_sections is None},
                          "latent_provisional": latent_sections is None}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
