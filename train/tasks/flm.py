"""Flow language models (``task: flm``) and what the FLM and FMLM tasks share.

The model and the objectives are ``flowmill.models.flow_lm`` and ``flowmill.train.flm_objective``
(t = 0 is data, t = 1 is noise, x_t = (1 - t)·onehot(tokens) + t·noise). Data are token
sequences packed by ``flowmill data pack text``; their manifest names the tokenizer (sha256),
its vocabulary and the sequence length, which are checked against the model before the first
step. The run dir keeps a copy of the tokenizer, so sampling and resume need only the run dir.

Every evaluation logs ``val/ce`` (and ``val/ce_tau{tau}``) on held-out text over a fixed grid of
the discrete clock (``lm_eval.val_clock``) and, from ``sample.num_per_prompt`` samples of
``sample.steps`` steps, ``sample/entropy`` and, with a judge (``judge.cache_dir``, see
``flowmill.train.judge``), ``sample/gen_ppl``. The samples of every evaluation go to MLflow as
text (``samples/text-{step}.txt``). The distillation task is in ``flowmill.train.tasks.fmlm``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from flowmill.data.decode import TokenDecoder
from flowmill.data.remote import Storage
from flowmill.data.shards import sha256_file
from flowmill.data.text_tokenizer import TextTokenizer
from flowmill.errors import UsageError
from flowmill.files import copy_atomic
from flowmill.models.flow_lm import FLOW_LM_SIZES, FlowLM, FlowLMConfig, continuous_time
from flowmill.run_dir import RunDir
from flowmill.train import flm_objective as objective
from flowmill.train.config import Config, EvalConfig
from flowmill.train.distributed import DistEnv
from flowmill.train.evaluation import (
    Chunk,
    ItemStreams,
    Totals,
    alone,
    eval_chunks,
    gather_rows,
    item_generators,
)
from flowmill.train.judge import JudgeConfig, TextDataInfo, judge_of_job, text_data_info
from flowmill.train.tasks.base import Task
from flowmill.train.text_metrics import nll_total, unigram_entropies

SAMPLE_CHUNK = 64  # samples generated per sampler call (each sample has its own noise stream: any chunking gives the same samples)
EVAL_CHUNK = 64  # validation sequences per forward pass
FAMILY = "flow_lm"


@dataclass
class TextConfig:
    tokenizer: str = "datasets/shakespeare/text_tokenizer.model"  # sentencepiece model the data was packed with (copied into the run dir)


@dataclass
class LMEvalConfig:
    val_clock: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])  # discrete-clock values tau (0 data, 1 noise) of the validation cross-entropy grid


@dataclass
class FlowLMModelConfig(FlowLMConfig):
    """The flow LM's architecture, optionally from a preset size."""

    presets: ClassVar[dict[str, FlowLMConfig]] = FLOW_LM_SIZES
    size: str | None = None  # a preset from FLOW_LM_SIZES (tiny, paper-tiny, small, medium); fields given beside it override it

    def architecture(self) -> FlowLMConfig:
        """The plain FlowLMConfig: what defines the model's function and its weights."""
        return flow_lm_architecture(dataclasses.asdict(self))


def flow_lm_architecture(model_section: dict[str, Any]) -> FlowLMConfig:
    """The FlowLMConfig of a run's ``model`` section (as saved in its config.yaml)."""
    names = {f.name for f in dataclasses.fields(FlowLMConfig)}
    return FlowLMConfig(**{key: value for key, value in model_section.items() if key in names})


@dataclass(frozen=True)
class TextFlowRunConfig(Config):
    """What the FLM and FMLM configs share."""

    lm_eval: LMEvalConfig = field(default_factory=LMEvalConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)


@dataclass(frozen=True)
class FLMRunConfig(TextFlowRunConfig):
    task: str = "flm"
    model: FlowLMModelConfig = field(default_factory=FlowLMModelConfig)
    text: TextConfig = field(default_factory=TextConfig)


class Trainee:
    """The engine's forward as the objectives see a model: callable, with the live model's plain attributes."""

    def __init__(self, forward: Callable[..., torch.Tensor], module: FlowLM):
        self._forward = forward
        self.vocab_size = module.vocab_size
        self.seq_len = module.seq_len
        self.loss_weight = module.loss_weight  # DeepSpeed hooks every submodule, so a direct call sees its weights

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        return self._forward(*args)


def check_text_data(
    path: str, key: str, text_tokenizer_path: Path, tokenizer: TextTokenizer, model: FlowLMConfig, model_key: str,
    storage: Storage | None = None,
) -> TextDataInfo:
    """The manifest facts of packed text at ``path``; UsageError (naming ``key``) unless it fits the model.

    The data must have been packed with this very tokenizer (sha256 in its manifest) and hold
    sequences of exactly the model's length: longer ones do not fit its seq_len, shorter
    ones would train positions the sampler never fills.
    """
    try:
        info = text_data_info(path, storage)
    except (FileNotFoundError, ValueError, KeyError) as error:
        raise UsageError(f"{key}: {error}; flow LMs read token sequences packed by `flowmill data pack text`") from None
    if info.text_tokenizer_sha256 != sha256_file(text_tokenizer_path):
        raise UsageError(
            f"{key}: {path} was packed with another tokenizer ({info.vocab_size} pieces) than {text_tokenizer_path} "
            f"({tokenizer.vocab_size} pieces); pack the text with this tokenizer or use the one it was packed with"
        )
    if info.seq_len > model.seq_len:
        raise UsageError(
            f"{key}: {path} holds sequences of {info.seq_len} tokens, longer than the model's maximum "
            f"{model_key}={model.seq_len}; repack with --seq-len {model.seq_len} or raise {model_key}"
        )
    if info.seq_len < model.seq_len:
        raise UsageError(
            f"{key}: {path} holds sequences of {info.seq_len} tokens but {model_key}={model.seq_len} "
            f"(samples are {model.seq_len} tokens long); set {model_key}={info.seq_len} or repack with --seq-len {model.seq_len}"
        )
    return info


class TextFlowTask(Task):
    """What FLM and FMLM share: tokenizer, data checks, validation text, samples, metrics, ``flowmill sample``.

    A subclass sets ``self.text_tokenizer_path``, ``self.text_tokenizer`` and ``self.model_config`` in its
    ``__init__`` and provides the loss, the sampler and its validation metrics.
    """

    family = FAMILY
    model_key = "model.seq_len"  # the config key of the model's sequence length, for error messages
    sampling = "Euler jumps on the clock grid"  # how its samplers step (the one value of sample.sampler, euler, means this)

    cfg: TextFlowRunConfig

    def __init__(self, cfg: TextFlowRunConfig, env: DistEnv, run_dir: RunDir):
        super().__init__(cfg, env, run_dir)
        self.text_tokenizer_path: Path
        self.text_tokenizer: TextTokenizer
        self.model_config: FlowLMConfig
        self.live: FlowLM | None = None  # the model being trained (build_model), for its plain attributes
        self._checked: dict[str, TextDataInfo] = {}
        self._val_tokens: torch.Tensor | None = None
        self._judge: nn.Module | None = None
        self._samples: tuple[int, torch.Tensor] | None = None  # (step, tokens) of the last evaluation

    @classmethod
    def validate_config(cls, cfg: TextFlowRunConfig) -> None:
        if cfg.sample.prompts:
            raise UsageError(f"sample.prompts: {cfg.task} models are unconditional; remove the prompts")
        if cfg.sample.sampler != "euler":
            raise UsageError(f"sample.sampler: {cfg.task} samples with {cls.sampling}; {cfg.sample.sampler!r} is not available, use euler")
        for key, value in (("sample.steps", cfg.sample.steps), ("sample.num_per_prompt", cfg.sample.num_per_prompt)):
            if value < 1:
                raise UsageError(f"{key}: must be at least 1, got {value}")
        if cfg.eval.timesteps != EvalConfig().timesteps:
            raise UsageError(f"eval.timesteps: {cfg.task} validates on a grid of the discrete clock; set lm_eval.val_clock instead")
        clock = cfg.lm_eval.val_clock
        if not clock or not all(0.0 <= tau <= 1.0 for tau in clock):
            raise UsageError(f"lm_eval.val_clock: need at least one clock value in [0, 1], got {clock}")

    def prepare_run_dir(self) -> None:
        """Keep a copy of the text tokenizer in the run dir."""
        if self.text_tokenizer_path != self.run_dir.text_tokenizer:
            copy_atomic(self.text_tokenizer_path, self.run_dir.text_tokenizer)

    def checked_data(self, path: str, key: str) -> TextDataInfo:
        """``check_text_data`` once per path."""
        if path not in self._checked:
            self._checked[path] = check_text_data(path, key, self.text_tokenizer_path, self.text_tokenizer, self.model_config,
                                                  self.model_key, self.cfg.data.storage())
        return self._checked[path]

    def decoder(self) -> TokenDecoder:
        """Raw sample → ``{"tokens": long (L,)}``, after checking that data.path fits the model."""
        self.checked_data(self.cfg.data.path, "data.path")
        return TokenDecoder(seq_len=self.model_config.seq_len, vocab_size=self.model_config.vocab_size)

    def validation_tokens(self) -> torch.Tensor:
        """The fixed held-out text (N, L): the first eval.num_samples sequences of eval.path (default data.path)."""
        if self._val_tokens is None:
            path, key = (self.cfg.eval.path, "eval.path") if self.cfg.eval.path else (self.cfg.data.path, "data.path")
            self.checked_data(path, key)
            self._val_tokens = self.first_batch(path, self.cfg.eval.num_samples)["tokens"]
        return self._val_tokens

    def val_times(self) -> torch.Tensor:
        """Flowmill times t (G,) of the clock values lm_eval.val_clock."""
        clock = torch.tensor(self.cfg.lm_eval.val_clock, dtype=torch.float64)
        return continuous_time(clock, self.model_config.vocab_size).float()

    def judge(self) -> nn.Module | None:
        """The cached judge of data.path (trained by rank 0 on first use), or None without judge.cache_dir.

        Collective on first use: every rank calls it in ``evaluate``."""
        if self.cfg.judge.cache_dir is None:
            return None
        if self._judge is None:
            self.checked_data(self.cfg.data.path, "data.path")
            model, _ = judge_of_job(self.cfg.data.path, self.cfg.judge, self.env, val_path=self.cfg.eval.path,
                                    storage=self.cfg.data.storage())
            self._judge = model.to(self.env.device)
        return self._judge

    def sample_tokens(self, model: nn.Module, num_samples: int, steps: int, generator: objective.Noise) -> torch.Tensor:
        """Tokens (N, L) from ``model`` (EMA weights) in ``steps`` steps; ``generator`` draws the starting noise."""
        raise NotImplementedError

    def validation_metrics(self, model: nn.Module, tokens: torch.Tensor, seed: int, env: DistEnv) -> dict:
        """Metrics of ``model`` on held-out tokens (N, L); each rank of ``env`` scores its share, the noise of
        sequence i coming from its own stream (``seed``, i)."""
        raise NotImplementedError

    def sample_share(self, model: nn.Module, num_samples: int, steps: int, seed: int, env: DistEnv) -> torch.Tensor:
        """Tokens (n, L) on the CPU of this rank's share of ``num_samples`` samples (``evaluation.share``).

        Sample i starts from noise of its own stream, seeded from (``seed``, i), so a seed gives the
        same sample i for any count, any number of ranks and any SAMPLE_CHUNK.
        """
        tokens = [torch.zeros((0, self.model_config.seq_len), dtype=torch.long)]
        for chunk in eval_chunks(num_samples, SAMPLE_CHUNK, env):
            tokens.append(self.sample_tokens(model, len(chunk.items), steps, item_generators(seed, chunk.items)).cpu())
        return torch.cat(tokens)

    def generate(self, model: nn.Module, num_samples: int, steps: int, seed: int) -> torch.Tensor:
        """Tokens (num_samples, L) on the CPU, made by this process alone (see ``sample_share``)."""
        return self.sample_share(model, num_samples, steps, seed, alone(self.env))

    def samples_at(self, model: nn.Module, step: int, env: DistEnv) -> torch.Tensor:
        """The evaluation samples of ``step`` (sample.num_per_prompt of sample.steps steps), made once per step
        by the ranks of ``env`` together, gathered on each."""
        if self._samples is None or self._samples[0] != step:
            s = self.cfg.sample
            tokens = self.sample_share(model, s.num_per_prompt, s.steps, self.cfg.trainer.seed, env)
            self._samples = (step, gather_rows(tokens, env))
        return self._samples[1]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int) -> dict:
        """Validation metrics (``validation_metrics``), ``sample/entropy`` (mean over samples of their unigram
        entropy) and, with a judge, ``sample/gen_ppl`` (exp of the judge's mean NLL over every sampled token
        but the first); every rank generates and scores its share of the samples."""
        env = self.env
        metrics = self.validation_metrics(model, self.validation_tokens(), self.cfg.trainer.seed, env)
        s = self.cfg.sample
        tokens = self.sample_share(model, s.num_per_prompt, s.steps, self.cfg.trainer.seed, env)
        totals = Totals(["sample/entropy", "sample/nll"])
        totals.add("sample/entropy", unigram_entropies(tokens).sum(), len(tokens))
        judge = self.judge()
        if judge is not None:
            totals.add("sample/nll", *nll_total(judge, tokens))
        sample_metrics = totals.reduced(env)
        metrics["sample/entropy"] = sample_metrics["sample/entropy"]
        if judge is not None:
            metrics["sample/gen_ppl"] = math.exp(sample_metrics["sample/nll"])
        self._samples = (step, gather_rows(tokens, env))  # for the text samples of this step
        return metrics

    def texts(self, tokens: torch.Tensor) -> list[str]:
        return [self.text_tokenizer.decode(row.tolist()) for row in tokens]

    def log_samples(self, model: nn.Module, step: int, out_dir: Path) -> list[Path]:
        """``text-{step}.txt``: the evaluation samples of this step, detokenized, one block each."""
        texts = self.texts(self.samples_at(model, step, alone(self.env)))  # rank 0 alone
        path = out_dir / f"text-{step:08d}.txt"
        header = f"{len(texts)} samples of {self.cfg.sample.steps} steps at training step {step}\n"
        path.write_text(header + "".join(f"\n=== sample {i} ===\n{text}\n" for i, text in enumerate(texts)))
        return [path]

    def sample_command(self, model: nn.Module, source: Path, args: argparse.Namespace) -> int:
        """``args.num_samples`` samples of ``args.steps`` steps into the JSON-lines file ``args.out``: {"text": ...} each."""
        if args.prompt:
            raise UsageError(f"--prompt: {self.cfg.task} runs generate unconditionally; drop --prompt")
        if args.sampler != "euler":
            raise UsageError(f"--sampler: {self.cfg.task} runs sample with {self.sampling}; {args.sampler!r} is not available")
        out = Path(args.out)
        if out.suffix != ".jsonl":
            raise UsageError(f"--out: a text run writes a .jsonl file (one {{\"text\": ...}} per line), got {out}")
        texts = self.texts(self.generate(model, args.num_samples, args.steps, args.seed))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
        for index, text in enumerate(texts[:3]):
            print(f"--- sample {index} ---\n{text}")
        print(f"wrote {len(texts)} samples ({args.steps} steps, seed {args.seed}) from {source} to {out}")
        return 0


def own_text_tokenizer(cfg: FLMRunConfig, run_dir: RunDir) -> tuple[Path, TextTokenizer]:
    """(path, tokenizer) of a run that trains its own text model: the run dir's copy once there, else
    text.tokenizer; UsageError unless it exists and has model.vocab_size pieces."""
    own = run_dir.text_tokenizer
    path = own if own.is_file() else Path(cfg.text.tokenizer)
    if not path.is_file():
        raise UsageError(
            f"text.tokenizer: {path} does not exist; train one with "
            "`flowmill data tokenizer PREFIX --text FILE --vocab-size N --newlines` and pack the text with it"
        )
    tokenizer = TextTokenizer.load(path)
    if tokenizer.vocab_size != cfg.model.vocab_size:
        raise UsageError(
            f"model.vocab_size: {cfg.model.vocab_size}, but the tokenizer {path} has "
            f"{tokenizer.vocab_size} pieces; set model.vocab_size={tokenizer.vocab_size}"
        )
    return path, tokenizer


class FLMTask(TextFlowTask):
    """``task: flm``: a flow language model trained with cross-entropy on the clean tokens."""

    config_class = FLMRunConfig
    cfg: FLMRunConfig

    def __init__(self, cfg: FLMRunConfig, env: DistEnv, run_dir: RunDir):
        super().__init__(cfg, env, run_dir)
        self.text_tokenizer_path, self.text_tokenizer = own_text_tokenizer(cfg, self.run_dir)
        self.model_config = cfg.model.architecture()

    def build_model(self) -> nn.Module:
        self.live = FlowLM(self.model_config)
        return self.live

    @classmethod
    def validate_config(cls, cfg: FLMRunConfig) -> None:
        super().validate_config(cfg)
        if cfg.parallel.pipeline_stages > 1 and cfg.model.learned_loss_weight:
            raise UsageError(
                "model.learned_loss_weight: the loss weight is no pipeline stage; set it to false or parallel.pipeline_stages=1"
            )

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        return objective.flm_loss(Trainee(model, self.live), batch["tokens"].to(self.env.device), generator)

    def inputs_and_target(self, batch: dict, generator: torch.Generator) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """Pipeline stages: ``(x_t, t)`` for the first stage, the tokens for ``criterion`` on the last; the
        same draws as ``loss``."""
        tokens = batch["tokens"].to(self.env.device)
        return objective.flm_inputs(tokens, self.model_config.vocab_size, generator), tokens

    def criterion(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output.float().transpose(1, 2), target)

    def sample_tokens(self, model: nn.Module, num_samples: int, steps: int, generator: objective.Noise) -> torch.Tensor:
        return objective.sample_flm(model, num_samples, steps, generator)

    def validation_metrics(self, model: nn.Module, tokens: torch.Tensor, seed: int, env: DistEnv) -> dict:
        """``val/ce_tau{tau}`` per clock value of lm_eval.val_clock and their mean ``val/ce``."""
        clock = self.cfg.lm_eval.val_clock
        totals = Totals(ce_keys(clock))
        chunks = eval_chunks(len(tokens), EVAL_CHUNK, env)
        add_clock_ce(totals, model, tokens, chunks, self.val_times(), clock, ItemStreams(seed))
        return with_mean_ce(totals.reduced(env), clock)


def ce_keys(clock: list[float]) -> list[str]:
    return [f"val/ce_tau{tau:g}" for tau in clock]


def add_clock_ce(totals: Totals, model: nn.Module, tokens: torch.Tensor, chunks: list[Chunk], times: torch.Tensor,
                 clock: list[float], streams: ItemStreams) -> None:
    """Add to ``totals`` the cross-entropy of an FLM-like model on the ``chunks`` of tokens (N, L) at each time
    (``ce_keys(clock)``), each sequence noised from its own stream."""
    device = next(model.parameters()).device
    for chunk in chunks:
        part = tokens[chunk.rows].to(device)
        per_time = objective.validation_ce(model, part, times.to(device), streams.of(chunk))  # (G,) means over the chunk
        for key, value in zip(ce_keys(clock), per_time.tolist()):
            totals.add(key, value * len(part), len(part))


def with_mean_ce(metrics: dict, clock: list[float]) -> dict:
    """``metrics`` with ``val/ce``, the mean of its ``val/ce_tau{tau}`` over the clock grid."""
    return {**metrics, "val/ce": sum(metrics[key] for key in ce_keys(clock)) / len(clock)}
