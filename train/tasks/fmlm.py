"""Flow-map distillation of a flow language model (``task: fmlm``), after the FLM paper's FMLM.

Two stages, each its own run of ``task: fmlm`` chosen by ``distill.stage``; the two losses need
different trainable networks, and one run trains one:

1. ``corrector``: a flow-map network g, initialised from the teacher with a zero head, learns the
   second-order term of the teacher's flow map, ``X(x_t; t→s) = x_t + (s-t)·v_teacher + ½(s-t)²·g``
   (``flm_objective.fmlm_corrector_loss``); sampling calls teacher and corrector at every jump.
2. ``student``: one flow-map network, initialised from the teacher, regresses the corrected map
   of stage 1 (``flm_objective.fmlm_distill_loss``); it samples in 1, 2 or 4 network calls.

The jumps start on the teacher's training distribution, the tokens of data.path noised to a time,
or with ``distill.data_free: true`` on the teacher's own flow, ``distill.flow_steps`` Euler steps of
it from noise (no data is read; only the validation text of eval.path), where the samplers' states lie.

``distill.teacher`` names the FLM run (its latest checkpoint's EMA weights; a checkpoint folder
picks another) and stage 2 ``distill.corrector`` the stage-1 run. A run copies both into its run
dir (``teacher/``, ``corrector/``: config.yaml, ema.safetensors, source.json) with the tokenizer,
so resume and sampling need neither original run; a resume keeps the run's distill section.

Besides ``sample/entropy`` and ``sample/gen_ppl`` (see flowmill.train.tasks.flm), evaluations log
``val/distill_error`` on whole noise → data jumps and, for the student, ``val/ce`` of its jump
from the clock grid straight to data.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from flowmill.data.text_tokenizer import TextTokenizer
from flowmill.errors import UsageError
from flowmill.files import copy_atomic
from flowmill.models.flow_lm import FlowLM, FlowLMConfig
from flowmill.run_dir import CONFIG_FILE, EMA_FILE, SOURCE_FILE, Checkpoint, RunDir
from flowmill.train import flm_objective as objective
from flowmill.train.distributed import DistEnv
from flowmill.train.evaluation import ItemStreams, Totals, eval_chunks
from flowmill.train.tasks.base import PriorBatches
from flowmill.train.tasks.flm import (
    EVAL_CHUNK,
    FAMILY,
    TextFlowRunConfig,
    TextFlowTask,
    Trainee,
    add_clock_ce,
    ce_keys,
    flow_lm_architecture,
    with_mean_ce,
)
from flowmill.weights import read_ema, weights_sha256

STAGES = ("corrector", "student")


@dataclass
class DistillConfig:
    stage: str = "corrector"  # corrector (stage 1: learns the teacher map's second-order term) | student (stage 2: one network, 1-4 steps)
    teacher: str | None = None  # the FLM run dir (or one of its checkpoints/step-* folders) to distil
    corrector: str | None = None  # stage student only: the finished corrector run distilled from the same teacher
    data_free: bool = False  # start the jumps on the teacher's own flow from noise instead of on noised data (no data read)
    flow_steps: int = 8  # data_free: teacher Euler steps (evenly spaced in the clock) from noise to a jump's start


@dataclass(frozen=True)
class FMLMRunConfig(TextFlowRunConfig):
    task: str = "fmlm"
    distill: DistillConfig = field(default_factory=DistillConfig)


class JumpToData(nn.Module):
    """A flow-map model read as an FLM: ``forward(x_t, t)`` = logits of its jump from t straight to data (s = 0)."""

    def __init__(self, flow_map: FlowLM):
        super().__init__()
        self.flow_map = flow_map
        self.vocab_size = flow_map.vocab_size
        self.seq_len = flow_map.seq_len

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.flow_map(x_t, t, torch.zeros_like(t))


class FMLMTask(TextFlowTask):
    """``task: fmlm``: one stage of flow-map distillation of an FLM run (``distill.stage``)."""

    config_class = FMLMRunConfig
    cfg: FMLMRunConfig
    model_key = "the teacher's model.seq_len"

    @classmethod
    def validate_config(cls, cfg: FMLMRunConfig) -> None:
        super().validate_config(cfg)
        if cfg.parallel.pipeline_stages > 1:
            # Its loss calls teacher, corrector and the trainee on points made from their outputs: no single pass through stages.
            raise UsageError("parallel.pipeline_stages: fmlm trains without pipeline stages (ZeRO 0-3 only); set it to 1")
        distill = cfg.distill
        if distill.stage not in STAGES:
            raise UsageError(f"distill.stage: {distill.stage!r} is not one of {', '.join(STAGES)}")
        if not distill.teacher:
            raise UsageError("distill.teacher: give the FLM run to distil, e.g. distill.teacher=runs/flm-shakespeare")
        if distill.stage == "student" and not distill.corrector:
            raise UsageError("distill.corrector: the student stage needs the corrector run of stage 1, e.g. distill.corrector=runs/fmlm-corrector")
        if distill.stage == "corrector" and distill.corrector:
            raise UsageError("distill.corrector: only distill.stage=student takes a corrector; remove it or set distill.stage=student")
        if distill.data_free and distill.flow_steps < 1:
            raise UsageError(f"distill.flow_steps: data-free states need at least 1 teacher step, got {distill.flow_steps}")

    @classmethod
    def reads_data(cls, cfg: FMLMRunConfig) -> bool:
        return not cfg.distill.data_free

    def __init__(self, cfg: FMLMRunConfig, env: DistEnv, run_dir: RunDir):
        super().__init__(cfg, env, run_dir)
        self.stage = cfg.distill.stage
        own_teacher, own_corrector = self.run_dir.teacher, self.run_dir.corrector
        if (own_teacher / SOURCE_FILE).is_file():  # resume or sample: the run's own copies
            refuse_changed_distill(cfg, self.run_dir)
            self.teacher_files = ModelFiles.copied(own_teacher)
            self.text_tokenizer_path = self.run_dir.text_tokenizer
        else:
            self.teacher_files, self.text_tokenizer_path = teacher_source(cfg.distill.teacher)
        teacher_config = flow_lm_architecture(read_yaml(self.teacher_files.config)["model"])
        self.teacher = load_flow_lm(dataclasses.replace(teacher_config, learned_loss_weight=False),
                                    self.teacher_files.weights(), env.device)
        self.text_tokenizer = TextTokenizer.load(self.text_tokenizer_path)
        self.model_config = dataclasses.replace(teacher_config, flow_map=True, learned_loss_weight=self.stage == "corrector")
        self.corrector_files = self.corrector = None
        if self.stage == "student":
            if (own_corrector / SOURCE_FILE).is_file():
                self.corrector_files = ModelFiles.copied(own_corrector)
            else:
                self.corrector_files = corrector_source(cfg.distill.corrector, self.teacher_files.weights())
            corrector_config = dataclasses.replace(teacher_config, flow_map=True, learned_loss_weight=True)
            self.corrector = load_flow_lm(corrector_config, self.corrector_files.weights(), env.device)

    def prepare_run_dir(self) -> None:
        own_teacher = self.run_dir.teacher
        if self.teacher_files.folder != own_teacher:
            # The text tokenizer first: the teacher copy's source.json tells other ranks that both are there.
            copy_atomic(self.text_tokenizer_path, self.run_dir.text_tokenizer)
            self.teacher_files.copy_to(own_teacher)
        if self.corrector_files is not None and self.corrector_files.folder != self.run_dir.corrector:
            self.corrector_files.copy_to(self.run_dir.corrector)

    def build_model(self) -> nn.Module:
        """The flow map, starting as the teacher (the corrector with a zero head: g = 0)."""
        self.live = FlowLM(self.model_config)
        self.live.init_from_teacher(self.teacher, zero_head=self.stage == "corrector")
        return self.live

    def build_loader(self, replica: int, replicas: int, batch_size: int):
        if self.cfg.distill.data_free:
            return PriorBatches(replica, batch_size)
        return super().build_loader(replica, replicas, batch_size)

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        distill = self.cfg.distill
        if distill.data_free:  # the teacher's flow makes the states; only the batch's shape is read
            tokens = torch.zeros((len(batch["__key__"]), self.model_config.seq_len), dtype=torch.long, device=self.env.device)
        else:
            tokens = batch["tokens"].to(self.env.device)
        flow_steps = distill.flow_steps if distill.data_free else 0
        trainee = Trainee(model, self.live)
        if self.stage == "corrector":
            return objective.fmlm_corrector_loss(trainee, self.teacher, tokens, generator, flow_steps=flow_steps)
        return objective.fmlm_distill_loss(trainee, self.teacher, self.corrector, tokens, generator, flow_steps=flow_steps)

    def sample_tokens(self, model: nn.Module, num_samples: int, steps: int, generator: objective.Noise) -> torch.Tensor:
        if self.stage == "corrector":
            return objective.sample_corrected(self.teacher, model, num_samples, steps, generator)
        return objective.sample_fmlm(model, num_samples, steps, generator)

    def validation_metrics(self, model: nn.Module, tokens: torch.Tensor, seed: int, env: DistEnv) -> dict:
        """``val/distill_error`` on whole noise → data jumps; for the student also ``val/ce`` of its jump to data."""
        device = next(model.parameters()).device
        clock = self.cfg.lm_eval.val_clock
        student = self.stage == "student"
        totals = Totals(["val/distill_error", *(ce_keys(clock) if student else [])])
        streams = ItemStreams(seed)  # a sequence's CE noise continues its stream after its jump's noise
        chunks = eval_chunks(len(tokens), EVAL_CHUNK, env)
        for chunk in chunks:
            part = tokens[chunk.rows].to(device)
            start = torch.ones(len(part), dtype=torch.float64, device=device)  # clock 1 (noise) → 0 (data)
            if student:
                _, extra = objective.student_jump_loss(model, self.teacher, self.corrector, part, start, start - 1,
                                                       streams.of(chunk))
            else:
                _, extra = objective.corrector_jump_loss(model, self.teacher, part, start, start - 1, streams.of(chunk))
            totals.add("val/distill_error", extra["distill_error"].item() * len(part), len(part))
        if student:
            add_clock_ce(totals, JumpToData(model), tokens, chunks, self.val_times(), clock, streams)
        metrics = totals.reduced(env)
        return with_mean_ce(metrics, clock) if student else metrics


def read_yaml(path: Path) -> dict:
    return yaml.safe_load(Path(path).read_text())


def load_flow_lm(config: FlowLMConfig, weights: dict[str, torch.Tensor], device: torch.device) -> FlowLM:
    """A frozen FlowLM in eval mode holding ``weights`` (a learned loss weight there is dropped if
    ``config`` has none: distillation never reads a teacher's)."""
    state = dict(weights)
    if not config.learned_loss_weight:
        state = {k: v for k, v in state.items() if not k.startswith("loss_weight.")}
    model = FlowLM(config)
    model.load_state_dict(state)
    return model.to(device).eval().requires_grad_(False)


@dataclass
class ModelFiles:
    """A trained model another run depends on: its run's config and its EMA weights, in a
    checkpoint of that run or in the copy a distillation run keeps of them."""

    config: Path  # config.yaml of the run that trained it (its model section builds it)
    folder: Path  # the run dir it came from, or the folder of the copy
    origin: str  # where it came from, recorded in the copy's source.json
    checkpoint: Checkpoint | None = None  # the checkpoint whose EMA shards hold the weights (None: a copy)

    @classmethod
    def copied(cls, folder: Path) -> ModelFiles:
        """The copy ``copy_to`` made in ``folder``."""
        origin = json.loads((folder / SOURCE_FILE).read_text())["origin"]
        return cls(folder / CONFIG_FILE, folder, origin)

    def weights(self) -> dict[str, torch.Tensor]:
        """The whole EMA weights."""
        return read_ema(self.checkpoint) if self.checkpoint is not None else load_file(self.folder / EMA_FILE)

    def copy_to(self, folder: Path) -> None:
        """Copy config and weights into ``folder``; source.json, written last, marks the copy complete."""
        folder.mkdir(parents=True, exist_ok=True)
        copy_atomic(self.config, folder / CONFIG_FILE)
        weights = self.weights()
        partial = folder / f".{EMA_FILE}.partial"
        save_file(weights, partial)
        os.replace(partial, folder / EMA_FILE)
        record = {"origin": self.origin, "weights_sha256": weights_sha256(weights)}
        (folder / f".{SOURCE_FILE}.partial").write_text(json.dumps(record, indent=1) + "\n")
        os.replace(folder / f".{SOURCE_FILE}.partial", folder / SOURCE_FILE)


def refuse_changed_distill(cfg: FMLMRunConfig, run_dir: RunDir) -> None:
    """A resumed (or sampled) distillation run keeps its teacher, corrector and stage."""
    saved = run_dir.saved_config().get("distill") or {}
    # A key the run's config lacks came in a later release: the run was distilled with its default.
    defaults = dataclasses.asdict(type(cfg.distill)())
    for key, value in dataclasses.asdict(cfg.distill).items():
        if saved.get(key, defaults[key]) != value:
            raise UsageError(
                f"distill.{key}: {run_dir} was distilled with distill.{key}={saved.get(key, defaults[key])}, not {value}; "
                "start a new run to change what is distilled"
            )


def open_source(source: str, key: str) -> tuple[RunDir, Checkpoint, dict]:
    """(run dir, checkpoint, run config as plain data) of the run dir or checkpoint folder named by config key ``key``."""
    try:
        run_dir, checkpoint = RunDir.open(source)
    except UsageError as error:
        raise UsageError(f"{key}: {error}") from None
    return run_dir, checkpoint, run_dir.saved_config()


def teacher_source(source: str) -> tuple[ModelFiles, Path]:
    """The teacher's files and its text_tokenizer.model, from the FLM run (or checkpoint) ``source``.

    UsageError unless it is an FLM run: another model family, or a flow-map run given as the
    teacher, is refused.
    """
    run_dir, checkpoint, config = open_source(source, "distill.teacher")
    task, family = config.get("task"), checkpoint.meta.get("family")
    if family != FAMILY:
        raise UsageError(
            f"distill.teacher: {source} holds a {family} model (task {task}); FMLM distils a flow language model, a run of task flm"
        )
    if task != "flm":
        raise UsageError(f"distill.teacher: {source} is a {task} run (a flow map); the teacher must be the flm run it was distilled from")
    origin = f"{run_dir.path.resolve()} {checkpoint.path.name}"
    return ModelFiles(run_dir.config_file, run_dir.path, origin, checkpoint), run_dir.text_tokenizer


def corrector_source(source: str, teacher_weights: dict[str, torch.Tensor]) -> ModelFiles:
    """The files of the stage-1 run ``source``; UsageError unless it is a corrector run distilled from
    the teacher whose weights are ``teacher_weights``."""
    run_dir, checkpoint, config = open_source(source, "distill.corrector")
    stage = (config.get("distill") or {}).get("stage")
    if config.get("task") != "fmlm" or stage != "corrector":
        raise UsageError(
            f"distill.corrector: {source} is a {config.get('task')} run{f' of stage {stage}' if stage else ''}; "
            "it must be an fmlm run with distill.stage=corrector"
        )
    if weights_sha256(load_file(run_dir.teacher / EMA_FILE)) != weights_sha256(teacher_weights):
        raise UsageError(f"distill.corrector: {source} was distilled from another teacher than distill.teacher")
    return ModelFiles(run_dir.config_file, run_dir.path, f"{run_dir.path.resolve()} {checkpoint.path.name}", checkpoint)
