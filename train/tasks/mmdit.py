"""Text-to-image rectified flow with an MMDiT (Stable Diffusion 3's objective).

t = 0 is data, t = 1 is noise: x_t = (1 - t)·x0 + t·noise, the model predicts v = noise - x0.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flowmill.data.decode import ImageTextDecoder
from flowmill.data.loader import StreamingLoader
from flowmill.data.tokenizer import Tokenizer
from flowmill.models.flow_path import FlowPath, build_timestep_sampler, shift_time
from flowmill.models.mmdit import MMDiT, MMDiTConfig
from flowmill.models.samplers import build_sampler, cfg_velocity
from flowmill.models.text_encoder import TextEncoder, TextEncoderConfig
from flowmill.train.config import ConfigError
from flowmill.train.images import image_grid, save_images
from flowmill.train.tasks.base import Task

TOKENIZER_FILE = "tokenizer.model"
TEXT_ENCODER_FILE = "text_encoder.safetensors"


@dataclass
class RectifiedFlowConfig:
    timesteps: str = "logit_normal"  # timestep distribution: logit_normal | uniform | mode
    logit_mean: float = 0.0  # logit_normal: mean of the normal before the sigmoid
    logit_std: float = 1.0  # logit_normal: std of the normal before the sigmoid
    mode_scale: float = 1.29  # mode: heavy-tail scale s of SD3's mode sampling
    shift: float = 1.0  # resolution-dependent timestep shift (1: none), training and sampling
    cfg_drop_prob: float = 0.1  # probability of replacing the prompt by the empty prompt (for CFG)
    image_field: str = "png"  # WebDataset field holding the image (png or jpg); the caption is the .txt field


class MMDiTTask(Task):
    config_sections = {"model": MMDiTConfig, "text": TextEncoderConfig, "flow": RectifiedFlowConfig}
    family = "mmdit"

    @classmethod
    def validate_config(cls, cfg: Any) -> None:
        try:
            build_timestep_sampler(cfg.flow.timesteps, **timestep_kwargs(cfg.flow))
        except ValueError as error:
            raise ConfigError(f"flow.timesteps: {error}") from None
        if not 0.0 <= cfg.flow.cfg_drop_prob < 1.0:
            raise ConfigError(f"flow.cfg_drop_prob: must be in [0, 1), got {cfg.flow.cfg_drop_prob}")
        if cfg.model.txt_dim != cfg.text.dim or cfg.model.vec_dim != cfg.text.dim:
            raise ConfigError(
                f"model.txt_dim: the MMDiT's txt_dim ({cfg.model.txt_dim}) and vec_dim ({cfg.model.vec_dim}) "
                f"must equal text.dim ({cfg.text.dim})"
            )

    def __init__(self, cfg: Any, env: Any, run_dir: Path):
        super().__init__(cfg, env, run_dir)
        own_tokenizer = self.run_dir / TOKENIZER_FILE
        self.tokenizer_path = str(own_tokenizer if own_tokenizer.exists() else Path(cfg.text.tokenizer))
        if not Path(self.tokenizer_path).is_file():
            raise ConfigError(
                f"text.tokenizer: {self.tokenizer_path} does not exist; train one with `flowmill data tokenizer` "
                "(make run does it for the digits)"
            )
        self.tokenizer = Tokenizer.load(self.tokenizer_path)
        self.text_encoder = TextEncoder(
            cfg.text,
            vocab_size=self.tokenizer.vocab_size,
            pad_id=self.tokenizer.pad_id,
            bos_id=self.tokenizer.bos_id,
            eos_id=self.tokenizer.eos_id,
        )
        weights = self.run_dir / TEXT_ENCODER_FILE
        if weights.exists():
            from safetensors.torch import load_file

            self.text_encoder.load_state_dict(load_file(weights))
        self.text_encoder.to(env.device)
        self.path = FlowPath()
        self.timesteps = build_timestep_sampler(cfg.flow.timesteps, **timestep_kwargs(cfg.flow))
        self._val_batch = None
        null_ids, null_mask = self.tokenizer.encode_padded([""], cfg.text.max_length)
        self.null_txt, self.null_vec = self.text_encoder(null_ids.to(env.device), null_mask.to(env.device))

    def prepare_run_dir(self) -> None:
        from safetensors.torch import save_file

        if Path(self.tokenizer_path) != self.run_dir / TOKENIZER_FILE:
            shutil.copyfile(self.tokenizer_path, self.run_dir / TOKENIZER_FILE)
        if not (self.run_dir / TEXT_ENCODER_FILE).exists():
            state = {k: v.contiguous() for k, v in self.text_encoder.state_dict().items()}
            save_file(state, self.run_dir / TEXT_ENCODER_FILE)

    def build_model(self) -> nn.Module:
        return MMDiT(self.cfg.model)

    def decoder(self) -> ImageTextDecoder:
        return ImageTextDecoder(
            image_field=self.cfg.flow.image_field,
            channels=self.cfg.model.in_channels,
            size=self.cfg.model.sample_size,
            tokenizer=self.tokenizer,
            max_len=self.cfg.text.max_length,
        )

    def inputs_and_target(self, batch: dict, generator: torch.Generator) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """(x_t, t, txt, vec) with prompts dropped to the empty prompt at cfg_drop_prob, and v = noise - x0."""
        device = self.env.device
        x0 = batch["img"].to(device)
        txt, vec = self.text_encoder(batch["txt_ids"].to(device), batch["txt_mask"].to(device))
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
            source = self.cfg.eval.path or self.cfg.data.path
            loader = StreamingLoader(
                source, rank=0, world_size=1, batch_size=self.cfg.eval.num_samples, num_workers=0,
                seed=0, decode=self.decoder(), shuffle_buffer=0, resampled=False,
            )
            self._val_batch = next(iter(loader))
        return self._val_batch

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int) -> dict:
        """Validation loss on a fixed time grid with fixed noise: ``val/loss`` and ``val/loss_t{t}``."""
        batch = self.validation_batch()
        device = next(model.parameters()).device
        x0 = batch["img"].to(device)
        txt, vec = self.text_encoder(batch["txt_ids"].to(device), batch["txt_mask"].to(device))
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(self.cfg.trainer.seed)).to(device)
        metrics = {}
        for value in self.cfg.eval.timesteps:
            t = torch.full((x0.shape[0],), value, device=device)
            sample = self.path.sample(x0, noise, t)
            metrics[f"val/loss_t{value:g}"] = F.mse_loss(model(sample.x_t, t, txt, vec).float(), sample.target.float()).item()
        metrics["val/loss"] = sum(metrics.values()) / len(metrics)
        return metrics

    @torch.no_grad()
    def generate(self, model: nn.Module, prompts: list[str], num_per_prompt: int, steps: int, cfg_scale: float, sampler: str, seed: int) -> torch.Tensor:
        """Images (len(prompts)·num_per_prompt, C, H, W) in [-1, 1], prompt-major order."""
        device = self.env.device
        repeated = [p for p in prompts for _ in range(num_per_prompt)]
        ids, mask = self.tokenizer.encode_padded(repeated, self.cfg.text.max_length)
        txt, vec = self.text_encoder(ids.to(device), mask.to(device))
        size, channels = self.cfg.model.sample_size, self.cfg.model.in_channels
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn((len(repeated), channels, size, size), generator=generator).to(device)
        velocity = cfg_velocity(model, txt, vec, self.null_txt, self.null_vec, cfg_scale)
        return build_sampler(sampler).sample(velocity, noise, steps=steps, shift=self.cfg.flow.shift).clamp(-1, 1)

    def sample_command(self, model: nn.Module, checkpoint: Path, args: Any) -> int:
        """PNG per sample, grid.png (one row per prompt) and samples.jsonl in ``args.out``."""
        if not args.prompt:
            raise ConfigError("--prompt: an MMDiT run needs at least one --prompt TEXT")
        try:
            build_sampler(args.sampler)
        except ValueError as error:
            raise ConfigError(f"--sampler: {error}") from None
        images = self.generate(model, args.prompt, args.num_samples, args.steps, args.cfg, args.sampler, args.seed)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        names = [f"{p:03d}-{i:03d}.png" for p in range(len(args.prompt)) for i in range(args.num_samples)]
        save_images(images, [out / name for name in names])
        image_grid(images, cols=args.num_samples, upscale=2).save(out / "grid.png")
        prompts = [prompt for prompt in args.prompt for _ in range(args.num_samples)]
        with open(out / "samples.jsonl", "w") as handle:
            for name, prompt in zip(names, prompts):
                handle.write(json.dumps({"file": name, "prompt": prompt}) + "\n")
        print(f"wrote {len(names)} samples from {checkpoint} to {out} (grid: {out / 'grid.png'})")
        return 0

    def log_samples(self, model: nn.Module, step: int, out_dir: Path) -> list[Path]:
        s = self.cfg.sample
        prompts = s.prompts or [""]
        images = self.generate(model, prompts, s.num_per_prompt, s.steps, s.cfg_scale, s.sampler, seed=self.cfg.trainer.seed)
        path = out_dir / f"grid-{step:08d}.png"
        image_grid(images, cols=s.num_per_prompt, upscale=2).save(path)
        return [path]


def timestep_kwargs(task_cfg: RectifiedFlowConfig) -> dict:
    """The parameters of the configured timestep distribution."""
    return {
        "logit_normal": {"mean": task_cfg.logit_mean, "std": task_cfg.logit_std},
        "mode": {"scale": task_cfg.mode_scale},
    }.get(task_cfg.timesteps, {})
