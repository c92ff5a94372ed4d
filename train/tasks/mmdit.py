"""Text-to-image rectified flow with an MMDiT (Stable Diffusion 3's objective).

t = 0 is data, t = 1 is noise: x_t = (1 - t)·x0 + t·noise, the model predicts v = noise - x0.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save, save_file
from torch import nn

from flowmill.data import decode
from flowmill.data.decode import ImageTextDecoder, npy_array
from flowmill.data.shards import read_manifest
from flowmill.data.text_tokenizer import TextTokenizer
from flowmill.data.video import encode_mp4
from flowmill.errors import UsageError
from flowmill.models.flow_path import FlowPath, build_timestep_sampler, shift_time
from flowmill.models.loading import load_weights
from flowmill.models.mmdit import MMDIT_SIZES, MMDiT, MMDiTConfig
from flowmill.models.samplers import Guidance, build_guidance, build_sampler, cfg_velocity
from flowmill.models.text_encoder import PretrainedTokenizer, PromptEncoder, TextEncoder, TextEncoderConfig, text_widths
from flowmill.run_dir import RunDir
from flowmill.train.config import Config
from flowmill.train.distributed import DistEnv
from flowmill.train.evaluation import Totals, eval_chunks, take
from flowmill.train.images import image_grid, save_images
from flowmill.train.tasks.base import Task
from flowmill.train.tasks.latents import LATENT_DRAWS, LatentDecoder, Latents, run_latents, save_section
from flowmill.train.tasks.video_tokenizer import TokenVideoDecoder
from flowmill.train.videos import clip_uint8, prompt_grid_gif

log = logging.getLogger("flowmill")

# Fields `flowmill data encode` (flowmill.train.encoders:text_encoder) writes per sample: txt (L, D), vec (D,).
CACHED_TXT, CACHED_VEC = "txt_emb.npy", "vec_emb.npy"


@dataclass
class MMDiTModelConfig(MMDiTConfig):
    """The MMDiT's architecture (the MMDiTConfig fields, optionally from a preset size) plus how a run builds it."""

    presets: ClassVar[dict[str, MMDiTConfig]] = MMDIT_SIZES

    init_from: str | None = None  # fine-tuning: start from this flowmill model folder or run dir (EMA weights); same architecture required
    size: str | None = None  # a preset from MMDIT_SIZES (tiny, small, sd3-medium); fields given beside it override it
    compile: bool = False  # torch.compile the joint blocks for training steps (inductor): same function, faster after a one-off compile

    def architecture(self) -> MMDiTConfig:
        """The plain MMDiTConfig: what defines the model's function and its weights."""
        return MMDiTConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(MMDiTConfig)})


def architecture_differences(ours: MMDiTConfig, theirs: MMDiTConfig) -> list[str]:
    """``key: ours vs theirs`` for each MMDiTConfig field where two architectures differ."""
    return [f"{f.name}: {getattr(ours, f.name)!r} vs {getattr(theirs, f.name)!r}"
            for f in dataclasses.fields(MMDiTConfig) if getattr(ours, f.name) != getattr(theirs, f.name)]


@dataclass
class CachedTextDecoder:
    """Image + caption + the caption's cached text embeddings: ImageTextDecoder's output plus
    ``txt_emb`` float (L, txt_dim) and ``vec_emb`` float (vec_dim,) from the shard's .npy fields."""

    images: ImageTextDecoder  # decodes the image and the caption
    txt_dim: int  # expected width of the cached sequence embedding
    vec_dim: int  # expected width of the cached pooled embedding

    def __call__(self, sample: dict) -> dict:
        out = self.images(sample)
        txt = npy_array(decode.field(sample, CACHED_TXT))
        vec = npy_array(decode.field(sample, CACHED_VEC))
        if txt.ndim != 2 or txt.shape[1] != self.txt_dim or vec.shape != (self.vec_dim,):
            raise ValueError(f"cached embeddings are txt {txt.shape}, vec {vec.shape}; the model takes "
                             f"txt (L, {self.txt_dim}) and vec ({self.vec_dim},)")
        out["txt_emb"] = torch.from_numpy(txt.astype("float32"))
        out["vec_emb"] = torch.from_numpy(vec.astype("float32"))
        return out


@dataclass
class RectifiedFlowConfig:
    timesteps: str = "logit_normal"  # timestep distribution: logit_normal | uniform | mode
    logit_mean: float = 0.0  # logit_normal: mean of the normal before the sigmoid
    logit_std: float = 1.0  # logit_normal: std of the normal before the sigmoid
    mode_scale: float = 1.29  # mode: heavy-tail scale s of SD3's mode sampling
    shift: float = 1.0  # resolution-dependent timestep shift (1: none), training and sampling
    cfg_drop_prob: float = 0.1  # probability of replacing the prompt by the empty prompt (for CFG)
    image_field: str = "png"  # WebDataset field holding the image (png or jpg, or a latent *.npy); the caption is the .txt field
    token_decoder: str | None = None  # a video tokenizer run whose token codes are the images (image_field codes.npy): samples are decoded to clips
    # Latent data (data.path encoded by `flowmill data encode --vae`): train on a fresh posterior draw per step
    # (sample, as SD3's training script) or on the posterior mean (mean); see flowmill.train.tasks.latents.
    latents: str = "sample"
    vae: str | None = None  # latent data: decode with this VAE instead of the one the manifest names (same weights required)


@dataclass(frozen=True)
class MMDiTRunConfig(Config):
    task: str = "mmdit"
    model: MMDiTModelConfig = field(default_factory=MMDiTModelConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    flow: RectifiedFlowConfig = field(default_factory=RectifiedFlowConfig)


class MMDiTTask(Task):
    config_class = MMDiTRunConfig
    family = "mmdit"
    flow_map: ClassVar[bool] = False  # the task's MMDiTs take an end time (model.flow_map)
    cfg: MMDiTRunConfig

    @classmethod
    def validate_config(cls, cfg: MMDiTRunConfig) -> None:
        try:
            build_timestep_sampler(cfg.flow.timesteps, **timestep_kwargs(cfg.flow))
        except ValueError as error:
            raise UsageError(f"flow.timesteps: {error}") from None
        if not 0.0 <= cfg.flow.cfg_drop_prob < 1.0:
            raise UsageError(f"flow.cfg_drop_prob: must be in [0, 1), got {cfg.flow.cfg_drop_prob}")
        try:
            txt_dim, vec_dim = text_widths(cfg.text)
        except ValueError as error:
            raise UsageError(str(error)) from None
        if (cfg.model.txt_dim, cfg.model.vec_dim) != (txt_dim, vec_dim):
            raise UsageError(
                f"model.txt_dim: the MMDiT takes txt_dim={cfg.model.txt_dim}, vec_dim={cfg.model.vec_dim}; the "
                f"{cfg.text.kind} text encoder gives txt width {txt_dim} and vec width {vec_dim} (set both to match)"
            )
        if cfg.flow.token_decoder is not None and cfg.flow.image_field != "codes.npy":
            raise UsageError(f"flow.image_field: a generator of video tokens reads their codes; set flow.image_field=codes.npy "
                              f"(got {cfg.flow.image_field!r})")
        if cfg.flow.latents not in LATENT_DRAWS:
            raise UsageError(f"flow.latents: unknown value {cfg.flow.latents!r}; choose one of: {', '.join(LATENT_DRAWS)}")
        if cfg.model.flow_map != cls.flow_map:
            raise UsageError(f"model.flow_map: task {cfg.task} trains "
                             + ("flow maps; set it to true" if cls.flow_map else
                                "velocity models; flow maps train with task: mmdit_flowmap"))
        if cfg.model.compile and cfg.parallel.zero_stage == 3:
            raise UsageError("model.compile: compiled blocks cannot run under ZeRO stage 3, whose parameter "
                              "hooks fire inside the blocks; use parallel.zero_stage 0-2 or model.compile=false")

    def __init__(self, cfg: MMDiTRunConfig, env: DistEnv, run_dir: RunDir):
        super().__init__(cfg, env, run_dir)
        text = cfg.text
        if text.pretrained is None:
            own_tokenizer = self.run_dir.text_tokenizer
            self.text_tokenizer_path = str(own_tokenizer if own_tokenizer.exists() else self.base_text_tokenizer())
            if not Path(self.text_tokenizer_path).is_file():
                raise UsageError(
                    f"text.tokenizer: {self.text_tokenizer_path} does not exist; train one with `flowmill data tokenizer` "
                    "(make run does it for the digits)"
                )
            tokenizer = TextTokenizer.load(self.text_tokenizer_path)
            self.text_encoder = TextEncoder(text, tokenizer.vocab_size, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id)
            weights = self.run_dir.text_encoder if self.run_dir.text_encoder.exists() else self.base_text_encoder()
            if weights is not None and weights.exists():
                self.text_encoder.load_state_dict(load_file(weights))
            # Random-weight encoders share flowmill's one tokenizer (clip+t5 feeds it to both).
            tokenizers = [tokenizer] * self.text_encoder.num_tokenizers
        else:
            self.text_encoder = TextEncoder(text)
            tokenizers = [PretrainedTokenizer(folder) for folder in (text.pretrained, text.t5_pretrained) if folder]
        self.text_encoder.to(env.device)
        self.prompts = PromptEncoder(self.text_encoder, tokenizers, text.max_length)
        if text.cached:
            for source in {cfg.data.path, cfg.eval.path or cfg.data.path}:
                self.check_cached(source)
        self.token_decoder = None
        if cfg.flow.token_decoder is not None:
            self.token_decoder = TokenVideoDecoder(cfg.flow.token_decoder, env.device)
            for source in {cfg.data.path, cfg.eval.path or cfg.data.path}:
                self.token_decoder.check(source, cfg.data.storage())
        self.latents: Latents | None = None if self.token_decoder is not None else run_latents(cfg, run_dir, env.device)
        self.path = FlowPath()
        self.timesteps = build_timestep_sampler(cfg.flow.timesteps, **timestep_kwargs(cfg.flow))
        self._val_batch = None
        self.null_txt, self.null_vec = self.prompts([""], env.device)

    def base_text_tokenizer(self) -> Path:
        """The text tokenizer a fresh run starts with (a run keeps its own copy): ``text.tokenizer``."""
        return Path(self.cfg.text.tokenizer)

    def base_text_encoder(self) -> Path | None:
        """The text encoder weights a fresh run starts with (None: initialised from ``text.seed``)."""
        return None

    def text_encoder_sha256(self) -> str:
        """sha256 of the text encoder's weights as ``text_encoder.safetensors`` stores them."""
        return hashlib.sha256(save(self.text_encoder_state())).hexdigest()

    def text_encoder_state(self) -> dict:
        return {k: v.detach().cpu().contiguous() for k, v in self.text_encoder.state_dict().items()}

    def check_cached(self, source: str) -> None:
        """Refuse cached embeddings that are missing or were made by another text encoder."""
        try:
            manifest = read_manifest(source, self.cfg.data.storage())
        except (FileNotFoundError, ValueError) as error:
            raise UsageError(f"text.cached: cannot check the cached embeddings of {source}: {error}") from None
        missing = [name for name in (CACHED_TXT, CACHED_VEC) if name not in manifest.get("fields", [])]
        if missing:
            raise UsageError(
                f"text.cached: {source} has no {', '.join(missing)} fields; cache them with `flowmill data encode "
                f"{source} OUT --encoder flowmill.train.encoders:text_encoder --arg run_dir=RUN --keep png txt`"
            )
        made_with = manifest.get("made", {}).get("params", {}).get("args", {}).get("description", {}).get("weights_sha256")
        if made_with is None:
            raise UsageError(f"text.cached: {source}'s manifest does not say which text encoder weights made it "
                              "(description.weights_sha256)")
        if made_with != self.text_encoder_sha256():
            raise UsageError(f"text.cached: {source} was encoded by other text encoder weights than this run's "
                              f"(sha256 {made_with[:12]}... vs {self.text_encoder_sha256()[:12]}...); re-encode it or "
                              "use the text section of the run that encoded it")

    def prepare_run_dir(self) -> None:
        if self.latents is not None:
            save_section(str(self.cfg.data.path), self.run_dir, self.cfg.data.storage())
        if self.cfg.text.pretrained is not None:
            return  # the run's config names the pretrained folders; they are not copied
        if Path(self.text_tokenizer_path) != self.run_dir.text_tokenizer:
            shutil.copyfile(self.text_tokenizer_path, self.run_dir.text_tokenizer)
        if not self.run_dir.text_encoder.exists():
            save_file(self.text_encoder_state(), self.run_dir.text_encoder)

    def build_model(self) -> nn.Module:
        """The MMDiT, from ``model.init_from``'s weights when a fresh run fine-tunes."""
        arch = self.cfg.model.architecture()
        model = MMDiT(arch)
        # Only a fresh run reads init_from: a resumed or sampled run's checkpoint replaces the
        # weights anyway, and must not depend on the base model folder still being there.
        if self.cfg.model.init_from and not self.run_dir.has_checkpoint():
            model.load_state_dict(self.init_weights(self.cfg.model.init_from, arch))
        if self.cfg.model.compile:
            model.compile_blocks()
        return model

    def init_weights(self, source: str, arch: MMDiTConfig) -> dict:
        """The state dict of a model folder or run dir (EMA), refused unless it is an MMDiT of this architecture."""
        try:
            family, theirs, state_dict = load_weights(source)
        except UsageError as error:
            raise UsageError(f"model.init_from: {error}") from None
        if family != self.family:
            raise UsageError(f"model.init_from: {source} holds a {family!r} model; an mmdit run starts only from an "
                              f"{self.family!r} one")
        differences = architecture_differences(arch, theirs)
        if differences:
            raise UsageError(f"model.init_from: {source}'s architecture differs from model.* (this run vs the folder): "
                              + "; ".join(differences))
        return state_dict

    def decoder(self) -> ImageTextDecoder | LatentDecoder | CachedTextDecoder:
        if self.latents is not None:
            images = LatentDecoder(self.cfg.model.in_channels, self.cfg.model.sample_size)
        else:
            images = ImageTextDecoder(
                image_field=self.cfg.flow.image_field,
                channels=self.cfg.model.in_channels,
                size=self.cfg.model.sample_size,
                tokenizer=None,  # captions are tokenized with the text encoder, in the training process
                max_len=self.cfg.text.max_length,
            )
        if self.cfg.text.cached:
            return CachedTextDecoder(images, self.cfg.model.txt_dim, self.cfg.model.vec_dim)
        return images

    def text_inputs(self, batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """txt (B, L, txt_dim), vec (B, vec_dim) of a batch: its cached embeddings or its encoded captions."""
        if self.cfg.text.cached:
            return batch["txt_emb"].to(device), batch["vec_emb"].to(device)
        return self.prompts(batch["txt"], device)

    def inputs_and_target(self, batch: dict, generator: torch.Generator) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """(x_t, t, txt, vec) with prompts dropped to the empty prompt at cfg_drop_prob, and v = noise - x0."""
        device = self.env.device
        x0 = self.latents.x0(batch, generator, device) if self.latents else batch["img"].to(device)
        txt, vec = self.text_inputs(batch, device)
        batch_size = x0.shape[0]
        drop = (torch.rand(batch_size, generator=generator) < self.cfg.flow.cfg_drop_prob).to(device)
        txt = torch.where(drop[:, None, None], self.null_txt.expand_as(txt), txt)
        vec = torch.where(drop[:, None], self.null_vec.expand_as(vec), vec)
        t = self.timesteps.sample(batch_size, generator=generator)
        t = shift_time(t, self.cfg.flow.shift).to(device)
        noise = torch.randn(x0.shape, generator=generator).to(device)
        sample = self.path.sample(x0, noise, t)
        return (sample.x_t, t, txt, vec), sample.target

    def criterion(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(output.float(), target.float())

    def validation_batch(self) -> dict:
        """The fixed held-out batch: the first eval.num_samples samples in shard order."""
        if self._val_batch is None:
            self._val_batch = self.first_batch(self.cfg.eval.path or self.cfg.data.path, self.cfg.eval.num_samples)
        return self._val_batch

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int) -> dict:
        """Validation loss on a fixed time grid with fixed noise: ``val/loss_t{t}`` and their mean ``val/loss``.

        The noise of the whole held-out batch is drawn from trainer.seed; each rank scores its rows.
        """
        batch = self.validation_batch()
        count = len(batch["img"])
        device = next(model.parameters()).device
        noise = torch.randn(batch["img"].shape, generator=torch.Generator().manual_seed(self.cfg.trainer.seed))
        keys = [f"val/loss_t{value:g}" for value in self.cfg.eval.timesteps]
        totals = Totals(keys)
        for chunk in eval_chunks(count, count, self.env):
            rows = take(batch, chunk.rows)
            x0 = self.latents.fixed_x0(rows, device) if self.latents else rows["img"].to(device)
            txt, vec = self.text_inputs(rows, device)
            for key, value in zip(keys, self.cfg.eval.timesteps):
                t = torch.full((x0.shape[0],), value, device=device)
                sample = self.path.sample(x0, noise[chunk.rows].to(device), t)
                error = (model(sample.x_t, t, txt, vec).float() - sample.target.float()).pow(2).flatten(1).mean(dim=1)
                totals.add(key, error.sum(), len(error))
        metrics = totals.reduced(self.env)
        metrics["val/loss"] = sum(metrics[key] for key in keys) / len(keys)
        return metrics

    @torch.no_grad()
    def generate(self, model: nn.Module, prompts: list[str], num_per_prompt: int, steps: int, guidance: Guidance | float,
                 sampler: str, seed: int) -> torch.Tensor:
        """Images (len(prompts)·num_per_prompt, C, H, W) in [-1, 1], prompt-major order, at the
        model's own sample_size (``model.config``: a model folder may be sampled with a run's text encoder);
        a latent model's latents are decoded by its VAE. ``guidance``: a ``Guidance`` of
        flowmill.models.samplers, or a number for constant CFG."""
        device = self.env.device
        for prompt, count in self.prompts.too_long(prompts):
            log.warning("prompt %r has %d tokens, more than text.max_length=%d: it is truncated",
                        prompt, count, self.cfg.text.max_length)
        repeated = [p for p in prompts for _ in range(num_per_prompt)]
        txt, vec = self.prompts(repeated, device)
        size, channels = model.config.sample_size, model.config.in_channels
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn((len(repeated), channels, size, size), generator=generator).to(device)
        velocity = cfg_velocity(model, txt, vec, self.null_txt, self.null_vec, guidance)
        result = build_sampler(sampler).sample(velocity, noise, steps=steps, shift=self.cfg.flow.shift)
        return self.latents.images(result) if self.latents else result.clamp(-1, 1)

    def sample_command(self, model: nn.Module, source: Path, args: argparse.Namespace) -> int:
        """PNG per sample, grid.png (one row per prompt) and samples.jsonl in ``args.out``; a
        generator of video tokens writes clips instead (see ``write_clips``)."""
        if not args.prompt:
            raise UsageError("--prompt: an MMDiT run needs at least one --prompt TEXT")
        channels = model.config.in_channels
        if self.latents is not None and channels != self.latents.channels:
            raise UsageError(f"{source}: the model makes {channels}-channel latents; its VAE ({self.latents.space.source}) "
                              f"decodes {self.latents.channels}-channel ones")
        if self.token_decoder is None and self.latents is None and channels not in (1, 3):
            raise UsageError(f"{source}: the model makes {channels}-channel latents, not 1- or 3-channel images, and "
                              "no VAE decodes them (train on `flowmill data encode --vae` latents, or import a full SD3 "
                              "folder, whose vae/ the model folder keeps)")
        try:
            build_sampler(args.sampler)
        except ValueError as error:
            raise UsageError(f"--sampler: {error}") from None
        guidance = build_guidance(args.guidance, args.cfg, args.raag_alpha)  # flowmill.train.sample checked the values
        images = self.generate(model, args.prompt, args.num_samples, args.steps, guidance, args.sampler, args.seed)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        if self.token_decoder is not None:
            return self.write_clips(images, args, out, source)
        names = [f"{p:03d}-{i:03d}.png" for p in range(len(args.prompt)) for i in range(args.num_samples)]
        save_images(images, [out / name for name in names])
        image_grid(images, cols=args.num_samples, upscale=2).save(out / "grid.png")
        prompts = [prompt for prompt in args.prompt for _ in range(args.num_samples)]
        with open(out / "samples.jsonl", "w") as handle:
            for name, prompt in zip(names, prompts):
                handle.write(json.dumps({"file": name, "prompt": prompt}) + "\n")
        print(f"wrote {len(names)} samples from {source} to {out} (grid: {out / 'grid.png'})")
        return 0

    def write_clips(self, codes: torch.Tensor, args: argparse.Namespace, out: Path, source: Path) -> int:
        """Generated token codes (P·N, d, h, w), decoded by the video tokenizer: ``PPP-NNN.npy``
        (uint8 (T, H, W, 3)) and ``.mp4`` per sample, grid.gif (one row per prompt) and samples.jsonl."""
        clips = self.token_decoder(codes, seed=args.seed)
        count = args.num_samples
        records = []
        for index, clip in enumerate(clips):
            prompt_index, sample_index = divmod(index, count)
            name = f"{prompt_index:03d}-{sample_index:03d}"
            frames = clip_uint8(clip)
            np.save(out / f"{name}.npy", frames)
            (out / f"{name}.mp4").write_bytes(encode_mp4(frames))
            records.append({"file": f"{name}.npy", "prompt": args.prompt[prompt_index]})
        prompt_grid_gif(clips, len(args.prompt), out / "grid.gif")
        with open(out / "samples.jsonl", "w") as handle:
            handle.writelines(json.dumps(record) + "\n" for record in records)
        print(f"wrote {len(records)} clips from {source}, decoded by {self.cfg.flow.token_decoder}, to {out} "
              f"(grid: {out / 'grid.gif'})")
        return 0

    def log_samples(self, model: nn.Module, step: int, out_dir: Path) -> list[Path]:
        s = self.cfg.sample
        prompts = s.prompts or [""]
        guidance = build_guidance(s.guidance, s.cfg_scale, s.raag_alpha)
        images = self.generate(model, prompts, s.num_per_prompt, s.steps, guidance, s.sampler, seed=self.cfg.trainer.seed)
        if self.token_decoder is not None:
            clips = self.token_decoder(images, seed=self.cfg.trainer.seed)
            return [prompt_grid_gif(clips, len(prompts), out_dir / f"clips-{step:08d}.gif")]
        path = out_dir / f"grid-{step:08d}.png"
        image_grid(images, cols=s.num_per_prompt, upscale=2).save(path)
        return [path]


def timestep_kwargs(task_cfg: RectifiedFlowConfig) -> dict:
    """The parameters of the configured timestep distribution."""
    return {
        "logit_normal": {"mean": task_cfg.logit_mean, "std": task_cfg.logit_std},
        "mode": {"scale": task_cfg.mode_scale},
    }.get(task_cfg.timesteps, {})
