"""Few-step text-to-image generation: a flow-map MMDiT (``task: mmdit_flowmap``).

The model is an MMDiT with an end-time input (``model.flow_map``, flowmill.models.mmdit) whose
output u(x, t, s) is the average velocity of the jump X(x; t→s) = x + (s - t)·u
(flowmill.models.flow_map); ``flowmill sample RUN --steps N`` takes N jumps from noise to data.
It trains with ``distill.objective`` lsd or psd (flowmill.train.flowmap_objective), in one of
three ways:

* from data alone (no ``distill.teacher``): self-distillation, the empty jumps (s = t, a
  ``distill.diagonal_share`` of each batch) learn the flow by flow matching, the others
  distil it from the network's own velocity;
* from a trained MMDiT run (``distill.teacher=RUN``): the map starts as the teacher (the end
  time's embedding starts at zero) and every target velocity is the teacher's, guided by
  ``distill.cfg_scale`` / ``distill.guidance`` (guidance distilled into the map);
* data-free (``distill.data_free: true``, with a teacher): no dataset is read; a jump starts
  on the teacher's own guided flow, integrated from noise in ``distill.flow_steps`` Euler
  steps, with prompts drawn from ``distill.prompts``.

A run keeps a copy of its teacher (``teacher/``: config.yaml, ema.safetensors, source.json) and
the teacher's text tokenizer and encoder, so resume and sampling need not find the teacher again.
Evaluations log ``val/map_error_{N}``: the mean squared distance between N jumps of the map
and a 32-step Euler solution of the reference flow (the teacher's guided one, or without a
teacher the map's own velocity) from the same noise and prompts; no data is read.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from flowmill.errors import UsageError
from flowmill.models.flow_map import load_velocity_weights, sample_jumps
from flowmill.models.mmdit import MMDIT_SIZES, MMDiT, MMDiTConfig
from flowmill.models.samplers import Guidance, Velocity, build_guidance, build_sampler, cfg_velocity
from flowmill.run_dir import SOURCE_FILE, RunDir
from flowmill.train import flowmap_objective as objective
from flowmill.train.distributed import DistEnv
from flowmill.train.evaluation import Totals, eval_chunks
from flowmill.train.tasks.base import PriorBatches
from flowmill.train.tasks.fmlm import ModelFiles, open_source, read_yaml, refuse_changed_distill
from flowmill.train.tasks.mmdit import MMDiTModelConfig, MMDiTRunConfig, MMDiTTask, architecture_differences

EVAL_JUMPS = (1, 2, 4)  # val/map_error_{N}
REFERENCE_STEPS = 32  # Euler steps of the reference flow in evaluations
TEXT_KEYS_FREE = ("tokenizer", "cached")  # text keys a flow-map run may set apart from its teacher's


@dataclass
class FlowMapModelConfig(MMDiTModelConfig):
    """The MMDiT of a flow-map run: MMDiTModelConfig with the end-time input."""

    presets: ClassVar[dict[str, MMDiTConfig]] = {name: dataclasses.replace(size, flow_map=True)
                                                 for name, size in MMDIT_SIZES.items()}
    flow_map: bool = True  # a flow-map run's MMDiT always takes the end time


@dataclass
class FlowMapDistillConfig:
    objective: str = "lsd"  # lsd (Lagrangian: end-time derivative by forward mode) | psd (progressive: one jump vs two half jumps)
    teacher: str | None = None  # a trained MMDiT run dir (or one of its checkpoints/step-* folders): the start and the target velocity
    data_free: bool = False  # states from the teacher's flow integrated from noise instead of data (needs a teacher)
    diagonal_share: float = 0.25  # share of each batch with s = t, learning the velocity itself
    noise_start_share: float = 0.0  # share of each batch whose jump starts from pure noise (t = 1), as every sampling's first
    cfg_scale: float = 1.0  # guidance distilled into the map: the teacher's guided velocity (1: none; with guidance raag its w_max)
    guidance: str = "cfg"  # cfg (constant cfg_scale) | raag (flowmill.models.samplers.RatioAwareGuidance)
    raag_alpha: float = 12.0  # RAAG's alpha, with guidance raag
    flow_steps: int = 8  # data_free: Euler steps of the teacher from noise to a jump's start
    prompts: list[str] = field(default_factory=list)  # data_free: the prompts drawn from (empty: sample.prompts)


@dataclass(frozen=True)
class JumpBatch:
    """One micro-batch's jumps: start states x_t (B, C, H, W) at times.t, the conditioning, the
    velocity the map distils, and the flow-matching target of the empty jumps (learning from data
    alone) or None."""

    x_t: torch.Tensor
    times: objective.JumpTimes
    txt: torch.Tensor
    vec: torch.Tensor
    velocity: Velocity
    flow_target: torch.Tensor | None


@dataclass(frozen=True)
class FlowMapRunConfig(MMDiTRunConfig):
    task: str = "mmdit_flowmap"
    model: FlowMapModelConfig = field(default_factory=FlowMapModelConfig)
    distill: FlowMapDistillConfig = field(default_factory=FlowMapDistillConfig)


def saved_architecture(model: dict) -> MMDiTConfig:
    """The MMDiTConfig of a saved run config's ``model`` section (its other keys, such as ``compile``, left out)."""
    return MMDiTConfig(**{f.name: model[f.name] for f in dataclasses.fields(MMDiTConfig) if f.name in model})


def teacher_source(source: str, cfg: FlowMapRunConfig) -> tuple[ModelFiles, RunDir]:
    """The files of the MMDiT run (or checkpoint) ``source`` and its run dir; UsageError naming
    ``distill.teacher`` unless it is a velocity MMDiT run of this run's architecture and text encoder."""
    run_dir, checkpoint, config = open_source(source, "distill.teacher")
    task = config.get("task")
    if task != "mmdit":
        raise UsageError(f"distill.teacher: {source} is a {task} run; a flow map distils a velocity MMDiT, a run of task mmdit")
    arch = dataclasses.replace(cfg.model.architecture(), flow_map=False)
    theirs = saved_architecture(config["model"])
    differences = architecture_differences(arch, theirs)
    if differences:
        raise UsageError(f"distill.teacher: {source}'s model differs from model.* (this run vs the teacher): "
                         + "; ".join(differences))
    text = dataclasses.asdict(cfg.text)
    differing = [f"text.{key}: {value!r} vs {config['text'].get(key)!r}" for key, value in text.items()
                 if key not in TEXT_KEYS_FREE and config["text"].get(key) != value]
    if differing:
        raise UsageError(f"distill.teacher: {source}'s text encoder differs from text.* (this run vs the teacher): "
                         + "; ".join(differing))
    origin = f"{run_dir.path.resolve()} {checkpoint.path.name}"
    return ModelFiles(run_dir.config_file, run_dir.path, origin, checkpoint), run_dir


class FlowMapTask(MMDiTTask):
    """``task: mmdit_flowmap``: a flow-map MMDiT sampled in a few jumps (see the module docstring)."""

    config_class = FlowMapRunConfig
    flow_map = True
    cfg: FlowMapRunConfig

    @classmethod
    def validate_config(cls, cfg: FlowMapRunConfig) -> None:
        super().validate_config(cfg)
        distill = cfg.distill
        if distill.objective not in objective.OBJECTIVES:
            raise UsageError(f"distill.objective: {distill.objective!r} is not one of {', '.join(objective.OBJECTIVES)}")
        if distill.objective == "lsd" and cfg.parallel.pipeline_stages > 1:
            raise UsageError("parallel.pipeline_stages: LSD differentiates the network in its end time by forward mode "
                             "(torch.func.jvp), which does not pass between pipeline stages; use distill.objective=psd, "
                             "or set parallel.pipeline_stages=1")
        if distill.objective == "lsd" and cfg.parallel.zero_stage == 3:
            raise UsageError("parallel.zero_stage: LSD's forward-mode derivative (torch.func.jvp) does not pass through "
                             "ZeRO-3's parameter gathering; use distill.objective=psd, or ZeRO 0-2")
        if distill.objective == "lsd" and cfg.model.compile:
            raise UsageError("model.compile: LSD's forward-mode derivative runs the blocks eagerly; set model.compile=false")
        if not 0.0 <= distill.diagonal_share < 1.0:
            raise UsageError(f"distill.diagonal_share: must be in [0, 1), got {distill.diagonal_share}")
        if not 0.0 <= distill.noise_start_share <= 1.0 - distill.diagonal_share:
            raise UsageError(f"distill.noise_start_share: must be in [0, 1 - distill.diagonal_share], got "
                             f"{distill.noise_start_share}")
        if distill.flow_steps < 1:
            raise UsageError(f"distill.flow_steps: must be at least 1, got {distill.flow_steps}")
        try:
            guidance = build_guidance(distill.guidance, distill.cfg_scale, distill.raag_alpha)
        except ValueError as error:
            raise UsageError(f"distill.guidance: {error}") from None
        if distill.teacher is None:
            if distill.data_free:
                raise UsageError("distill.data_free: data-free states come from a teacher's flow; set distill.teacher=RUN "
                                 "(a trained mmdit run)")
            if not guidance.identity:
                raise UsageError(f"distill.cfg_scale: guidance is distilled from a teacher's guided velocity, and there is no "
                                 f"distill.teacher; set it to 1 (got {distill.cfg_scale}) and guide each jump with "
                                 "`flowmill sample --cfg`, or set distill.teacher=RUN")
            if distill.diagonal_share == 0:
                raise UsageError("distill.diagonal_share: without a teacher the empty jumps are what learns the flow; "
                                 "it must be above 0")
        elif cfg.model.init_from:
            raise UsageError("model.init_from: a flow map starts from its distill.teacher; remove one of them")
        if distill.data_free and not (distill.prompts or cfg.sample.prompts):
            raise UsageError("distill.prompts: data-free training draws its prompts from distill.prompts (or "
                             "sample.prompts); give at least one")
        if cfg.sample.sampler != "euler":
            raise UsageError(f"sample.sampler: a flow map jumps, one network call per step, and has no ODE solver to "
                             f"choose; remove it or set euler (got {cfg.sample.sampler!r})")

    @classmethod
    def reads_data(cls, cfg: FlowMapRunConfig) -> bool:
        return not cfg.distill.data_free

    def __init__(self, cfg: FlowMapRunConfig, env: DistEnv, run_dir: RunDir):
        self.teacher_files: ModelFiles | None = None
        self.teacher_run: RunDir | None = None
        if (run_dir.teacher / SOURCE_FILE).is_file():  # resume or sample: the run's own copy
            refuse_changed_distill(cfg, run_dir)
            self.teacher_files = ModelFiles.copied(run_dir.teacher)
        elif cfg.distill.teacher:
            self.teacher_files, self.teacher_run = teacher_source(cfg.distill.teacher, cfg)
        super().__init__(cfg, env, run_dir)
        self.distill_guidance = build_guidance(cfg.distill.guidance, cfg.distill.cfg_scale, cfg.distill.raag_alpha)
        self._teacher: MMDiT | None = None
        self._prompt_table: tuple[torch.Tensor, torch.Tensor] | None = None

    def base_text_tokenizer(self) -> Path:
        return self.teacher_run.text_tokenizer if self.teacher_run is not None else super().base_text_tokenizer()

    def base_text_encoder(self) -> Path | None:
        return self.teacher_run.text_encoder if self.teacher_run is not None else None

    def prepare_run_dir(self) -> None:
        super().prepare_run_dir()
        if self.teacher_files is not None and self.teacher_files.folder != self.run_dir.teacher:
            self.teacher_files.copy_to(self.run_dir.teacher)

    @property
    def teacher(self) -> MMDiT | None:
        """The frozen teacher MMDiT in eval mode (loaded on first use), or None without one."""
        if self._teacher is None and self.teacher_files is not None:
            teacher = MMDiT(saved_architecture(read_yaml(self.teacher_files.config)["model"]))
            teacher.load_state_dict(self.teacher_files.weights())
            self._teacher = teacher.to(self.env.device).eval().requires_grad_(False)
        return self._teacher

    def build_model(self) -> nn.Module:
        """The flow map; a fresh run with a teacher starts as the teacher (the end time without effect)."""
        model = super().build_model()
        if self.teacher_files is not None and not self.run_dir.has_checkpoint():
            load_velocity_weights(model, self.teacher_files.weights())
        return model

    def build_loader(self, replica: int, replicas: int, batch_size: int):
        if self.cfg.distill.data_free:
            return PriorBatches(replica, batch_size)
        return super().build_loader(replica, replicas, batch_size)

    def prompt_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """txt (P, L, D) and vec (P, D) of the data-free prompts, encoded once."""
        if self._prompt_table is None:
            prompts = self.cfg.distill.prompts or self.cfg.sample.prompts
            self._prompt_table = self.prompts(list(prompts), self.env.device)
        return self._prompt_table

    def conditioning(self, batch: dict, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """txt (B, L, D), vec (B, D) of a batch (data-free: prompts drawn from the table), each row
        replaced by the empty prompt at flow.cfg_drop_prob."""
        device = self.env.device
        if self.cfg.distill.data_free:
            table_txt, table_vec = self.prompt_table()
            index = torch.randint(len(table_txt), (batch_size,), generator=generator).to(device)
            txt, vec = table_txt[index], table_vec[index]
        else:
            txt, vec = self.text_inputs(batch, device)
        drop = (torch.rand(batch_size, generator=generator) < self.cfg.flow.cfg_drop_prob).to(device)
        txt = torch.where(drop[:, None, None], self.null_txt.expand_as(txt), txt)
        vec = torch.where(drop[:, None], self.null_vec.expand_as(vec), vec)
        return txt, vec

    def reference_velocity(self, forward, txt: torch.Tensor, vec: torch.Tensor):
        """The velocity the map distils: the teacher's, guided as distill.* says, or (no teacher) the
        network's own diagonal, without gradient."""
        if self.teacher is not None:
            return cfg_velocity(self.teacher, txt, vec, self.null_txt, self.null_vec, self.distill_guidance)
        return lambda x, t: forward(x, t, txt, vec, t)

    def jump_batch(self, forward, batch: dict, generator: torch.Generator) -> JumpBatch:
        """A micro-batch's jumps, their start states and targets' ingredients; ``forward`` is the
        network (the reference velocity without a teacher)."""
        device = self.env.device
        cfg = self.cfg
        data_free = cfg.distill.data_free
        if data_free:
            batch_size = len(batch["__key__"])
        else:
            x0 = self.latents.x0(batch, generator, device) if self.latents else batch["img"].to(device)
            batch_size = x0.shape[0]
        txt, vec = self.conditioning(batch, batch_size, generator)
        times = objective.draw_jumps(batch_size, generator, device, cfg.distill.diagonal_share, cfg.distill.noise_start_share)
        velocity = self.reference_velocity(forward, txt, vec)
        shape = (batch_size, cfg.model.in_channels, cfg.model.sample_size, cfg.model.sample_size)
        noise = torch.randn(shape, generator=generator).to(device)
        flow_target = None
        if data_free:
            x_t = objective.flow_states(velocity, noise, times.t, cfg.distill.flow_steps)
        else:
            sample = self.path.sample(x0, noise, times.t)
            x_t = sample.x_t
            if self.teacher is None:
                flow_target = sample.target  # flow matching on the empty jumps: noise - x0
        return JumpBatch(x_t, times, txt, vec, velocity, flow_target)

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        jumps = self.jump_batch(model, batch, generator)

        def net(x: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            return model(x, t, jumps.txt, jumps.vec, s)

        return objective.flow_map_loss(self.cfg.distill.objective, net, jumps.x_t, jumps.times, jumps.velocity,
                                       jumps.flow_target)

    def inputs_and_target(self, batch: dict, generator: torch.Generator) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Pipeline runs (PSD): the inputs (x_t, t, txt, vec, s) of the jump the stages train and PSD's
        target, its two half jumps run through the whole pipeline without gradient (pipeline_forward)."""
        forward = self.pipeline_forward
        jumps = self.jump_batch(forward, batch, generator)

        def net(x: torch.Tensor, t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            return forward(x, t, jumps.txt, jumps.vec, s)

        target = objective.psd_target(net, jumps.x_t, jumps.times, jumps.velocity, jumps.flow_target)
        return (jumps.x_t, jumps.times.t, jumps.txt, jumps.vec, jumps.times.s), target

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int) -> dict:
        """``val/map_error_{N}`` for N in EVAL_JUMPS (see the module docstring): eval.num_samples rows,
        prompts cycled from sample.prompts (else the empty prompt), noise from trainer.seed."""
        device = next(model.parameters()).device
        count = self.cfg.eval.num_samples
        prompts = list(self.cfg.distill.prompts or self.cfg.sample.prompts or [""])
        size, channels = self.cfg.model.sample_size, self.cfg.model.in_channels
        noise = torch.randn((count, channels, size, size), generator=torch.Generator().manual_seed(self.cfg.trainer.seed))
        keys = [f"val/map_error_{jumps}" for jumps in EVAL_JUMPS]
        totals = Totals(keys)
        for chunk in eval_chunks(count, 64, self.env):
            rows = noise[chunk.rows].to(device)
            txt, vec = self.prompts([prompts[index % len(prompts)] for index in chunk.items], device)
            if self.teacher is not None:
                velocity = cfg_velocity(self.teacher, txt, vec, self.null_txt, self.null_vec, self.distill_guidance)
            else:
                velocity = cfg_velocity(model, txt, vec, self.null_txt, self.null_vec, 1.0)
            reference = build_sampler("euler").sample(velocity, rows, steps=REFERENCE_STEPS, shift=self.cfg.flow.shift)
            for key, jumps in zip(keys, EVAL_JUMPS):
                mapped = sample_jumps(model, rows, jumps, txt, vec, self.null_txt, self.null_vec, 1.0, self.cfg.flow.shift)
                error = (mapped.float() - reference.float()).pow(2).flatten(1).mean(dim=1)
                totals.add(key, error.sum(), len(error))
        return totals.reduced(self.env)

    @torch.no_grad()
    def generate(self, model: nn.Module, prompts: list[str], num_per_prompt: int, steps: int, guidance: Guidance | float,
                 sampler: str, seed: int) -> torch.Tensor:
        """Images (len(prompts)·num_per_prompt, C, H, W) in [-1, 1], prompt-major, from ``steps`` jumps of the
        map (``sampler`` does not apply); ``guidance`` guides each jump on top of what the map distilled."""
        device = self.env.device
        repeated = [p for p in prompts for _ in range(num_per_prompt)]
        txt, vec = self.prompts(repeated, device)
        size, channels = model.config.sample_size, model.config.in_channels
        noise = torch.randn((len(repeated), channels, size, size), generator=torch.Generator().manual_seed(seed)).to(device)
        result = sample_jumps(model, noise, steps, txt, vec, self.null_txt, self.null_vec, guidance, self.cfg.flow.shift)
        return self.latents.images(result) if self.latents else result.clamp(-1, 1)

    def sample_command(self, model: nn.Module, source: Path, args: argparse.Namespace) -> int:
        if args.sampler != "euler":
            raise UsageError(f"--sampler: a flow map jumps, one network call per step, and has no ODE solver to choose "
                             f"(got {args.sampler!r})")
        return super().sample_command(model, source, args)
