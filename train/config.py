"""Typed run configuration: YAML file + ``dotted.key=value`` overrides → a frozen dataclass.

One config is one run. ``Config`` holds the sections every task has; each task's config class
(``config_class`` of a task in flowmill.train.tasks) extends it with its own sections
(``model``, ``text``, ...), written in code so an editor follows ``cfg.model.depth`` to its
definition. OmegaConf structured configs do the type checking, so an unknown key or a wrong
type is refused with the key's full name. A loaded config is never changed: what a job
derives at run time (its run dir, the micro-batch after a world-size change) lives in
``flowmill.train.plan.Plan``.

A model section may name a preset size (``model.size: small``, from the model's size
table); the fields given beside it override single values of the preset.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from flowmill.config_files import apply_overrides, omegaconf_message, read_config
from flowmill.data.constants import DEFAULT_RETRIES
from flowmill.data.remote import Storage, StorageError
from flowmill.data.shards import resolve_shards
from flowmill.errors import UsageError
from flowmill.train.tasks import get_task_class

SIZE_KEY = "size"  # the key of a section that names a preset (model.size)


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"  # run name: the default run dir is runs/<name>-<UTC timestamp>, whose name the MLflow run takes
    dir: str | None = None  # run directory; default runs/<name>-<UTC timestamp> under the current directory
    sweep_id: str | None = None  # id shared by the runs of one sweep (set by `flowmill launch slurm --sweep`)


@dataclass(frozen=True)
class TrainerConfig:
    max_steps: int = 1000  # optimizer steps to train for
    seed: int = 0  # seeds model init, noise, data order
    micro_batch_size: int = 32  # samples per process per forward pass
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    precision: str = "fp32"  # fp32 | bf16
    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda
    sample_every_steps: int = 0  # log a sample grid every N steps (0: only at the end)
    eval_every_steps: int = 0  # run the task's evaluation every N steps (0: only at the end)
    num_threads: int = 0  # torch intra-op threads per process (0: cores / processes)
    log_every_steps: int = 10  # when stderr is a file, not a terminal: one progress line every N steps


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4  # peak learning rate of AdamW
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.999  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW epsilon
    warmup_steps: int = 0  # linear warmup from 0 to lr, in optimizer steps
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio after decay_steps
    decay_steps: int = 0  # optimizer steps of warmup + cosine decay (0: trainer.max_steps); fix it to extend a run on the same curve
    grad_clip: float = 1.0  # global gradient-norm clipping (0: off)


@dataclass(frozen=True)
class EMAConfig:
    enabled: bool = True  # keep an EMA of the weights (samples, evaluation and exports use it); false: the live weights
    decay: float = 0.9999  # final EMA decay per optimizer step
    warmup: bool = True  # decay = min(decay, (1 + step) / (10 + step)), so early weights fade fast
    device: str = "auto"  # where each rank keeps its EMA shard: auto (beside the weights) | cpu (host memory, for GPU runs) | cuda


@dataclass(frozen=True)
class ParallelConfig:
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3
    pipeline_stages: int = 1  # DeepSpeed pipeline stages (must divide the world size)
    activation_checkpointing: bool = False  # recompute block activations in backward
    timeout_min: float = 30.0  # minutes a collective waits for every rank before the job fails (evaluations and saves must fit)


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 500  # save a sharded checkpoint every N optimizer steps (and at the end)
    keep_last: int = 3  # keep this many most recent checkpoints (0: keep all)


@dataclass(frozen=True)
class TrackingConfig:
    uri: str | None = None  # MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else the SQLite store shared by the runs under runs/
    artifact_location: str | None = None  # artifact root of an experiment flowmill creates, e.g. s3://bucket/mlflow (default: the store's)
    experiment: str = "flowmill"  # MLflow experiment name
    tags: dict[str, str] = field(default_factory=dict)  # user tags on the MLflow run, e.g. {team: vision, ablation: lr}
    description: str | None = None  # the MLflow run's description (Markdown; the mlflow.note.content tag)
    register_as: str | None = None  # at the end, register the logged EMA model in MLflow's model registry under this name
    system_metrics: bool = True  # log CPU/memory/GPU usage through MLflow's system metrics
    system_metrics_interval_s: float = 10.0  # seconds between system-metric samples
    retry_after_s: float = 60.0  # seconds calls wait in memory after the store failed before they are sent again


@dataclass(frozen=True)
class DataConfig:
    path: str = "datasets/digits"  # dataset: a folder with manifest.json, a manifest, a brace pattern or a glob; local or s3://, gs://, http(s)://
    num_workers: int = 1  # dataloader worker processes per rank
    shuffle_buffer: int = 256  # samples in the shuffle buffer (0: no sample shuffle)
    log_keys: bool = False  # write each step's sample keys to logs/keys-rank-R.jsonl (to audit the data order)
    max_skip_fraction: float = 0.1  # stop the run when more than this fraction of samples read is bad
    verify_shards: bool = True  # check each shard against the manifest's sha256 before reading it
    storage_options: dict[str, Any] = field(default_factory=dict)  # keywords of the fsspec filesystem of remote shards, e.g. {endpoint_url: http://HOST:9000}; default: the environment's credentials
    retries: int = DEFAULT_RETRIES  # retries of a remote open or read that failed transiently, with backoff from 1 s, before the shard counts as failed

    def storage(self) -> Storage:
        """How remote shards, manifests and eval data are reached (``flowmill.data.remote``)."""
        return Storage(dict(self.storage_options), retries=self.retries)


@dataclass(frozen=True)
class EvalConfig:
    path: str | None = None  # held-out dataset for validation (default: the first samples of data.path)
    num_samples: int = 256  # validation samples, fixed for the whole run
    timesteps: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])  # fixed time grid of the validation loss


@dataclass(frozen=True)
class SampleConfig:
    prompts: list[str] = field(default_factory=list)  # prompts for the sample grids logged during training
    num_per_prompt: int = 4  # samples per prompt in a grid
    steps: int = 25  # ODE solver steps
    cfg_scale: float = 3.0  # classifier-free guidance scale (1: no guidance); with guidance raag, RAAG's w_max (>= 1)
    sampler: str = "euler"  # ODE solver: euler | heun
    guidance: str = "cfg"  # cfg: constant cfg_scale | raag: scale 1 + (cfg_scale - 1)·exp(-raag_alpha·ratio) (models/samplers.py)
    raag_alpha: float = 12.0  # RAAG's alpha (>= 0): how fast the scale falls as ||v_cond - v_uncond|| / ||v_uncond|| grows


@dataclass(frozen=True)
class SlurmConfig:
    partition: str | None = None  # SLURM partition (None: the cluster's default partition)
    nodes: int = 1  # nodes of the job
    tasks_per_node: int = 1  # training processes per node (one per GPU)
    time_min: int = 60  # wall-clock limit of one attempt, in minutes; the job checkpoints and requeues itself before it
    account: str | None = None  # sbatch --account
    qos: str | None = None  # sbatch --qos
    constraint: str | None = None  # sbatch --constraint (node features)
    mem: str | None = None  # memory per node in sbatch syntax, e.g. 64G (None: the partition's default)
    cpus_per_task: int | None = None  # CPU cores per process (None: the partition's default)
    gpus_per_node: int = 0  # GPUs per node
    extra: dict[str, Any] = field(default_factory=dict)  # more sbatch options, e.g. {reservation: r1, exclusive: true}
    max_retries: int = 2  # requeues after a crash before the job fails for good (preemptions and time limits do not count)
    signal_delay_s: int = 120  # seconds before the time limit at which SLURM sends USR2 (checkpoint and requeue)
    folder: str | None = None  # submitit folder (scripts, pickles, logs); default <run dir parent>/slurm/<run dir name>
    setup: list[str] = field(default_factory=list)  # shell lines run by the batch script before srun starts the tasks
    python: str | None = None  # shell command starting each task's Python, e.g. "apptainer exec --nv x.sif python" (None: this one)
    srun_args: list[str] = field(default_factory=list)  # more arguments of the srun that starts the tasks, one per entry


@dataclass(frozen=True)
class LauncherConfig:
    slurm: SlurmConfig = field(default_factory=SlurmConfig)  # `flowmill launch slurm` options (CLI flags override them)


@dataclass(frozen=True)
class Config:
    """Sections every task has. Each task's config class extends it with its own sections
    (``model`` and more, see the ``config_class`` of each task in flowmill.train.tasks)."""

    task: str = "mmdit"  # what is trained; one of train.tasks.TASKS
    run: RunConfig = field(default_factory=RunConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)


def load_config(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """Read a config (a YAML path or a shipped name, see flowmill.config_files; or ``base``, a
    resolved config as plain data) and apply overrides.

    Returns the task's config dataclass, checked (``validate``). Raises UsageError naming the
    offending key.
    """
    raw = read_config(path) if base is None else base
    plain = apply_overrides(raw, overrides)
    try:
        schema = get_task_class(plain.get("task", Config.task)).config_class
    except KeyError as error:
        raise UsageError(f"task: {error.args[0]}") from None
    cfg = typed(schema, expand_presets(schema, plain))
    validate(cfg)
    return cfg


def expand_presets(schema: type, plain: dict[str, Any]) -> dict[str, Any]:
    """Replace each ``SECTION.size`` by the preset's fields, under the fields given beside it."""
    expanded = dict(plain)
    for section in dataclasses.fields(schema):
        values = plain.get(section.name)
        presets = getattr(section.default_factory, "presets", {})  # the section's dataclass may carry a size table
        if not isinstance(values, dict) or values.get(SIZE_KEY) is None:
            continue
        name = values[SIZE_KEY]
        if name not in presets:
            raise UsageError(f"{section.name}.{SIZE_KEY}: unknown size {name!r}; choose one of: {', '.join(presets) or '(none)'}")
        expanded[section.name] = {**dataclasses.asdict(presets[name]), **values}
    return expanded


def typed(schema: type, plain: dict[str, Any]) -> Config:
    """``plain`` checked against ``schema`` and built into it; UsageError naming the key."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), plain)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise UsageError(omegaconf_message(error)) from None
    except ValueError as error:  # a section's own checks (its __post_init__)
        raise UsageError(f"{_failing_section(merged)}: {error}") from None


def _failing_section(merged: Any) -> str:
    """The name of the first section of ``merged`` whose dataclass refuses its values."""
    for name in merged:
        try:
            OmegaConf.to_object(merged[name]) if OmegaConf.is_config(merged[name]) else None
        except ValueError:
            return name
    return "config"


def check_data_source(cfg: Config) -> None:
    """The dataset ``data.path`` names exists and lists its shards (a manifest that reads), and a
    remote one can be reached (endpoint, credentials, bucket; after ``data.retries``), for a task
    that reads one."""
    if not get_task_class(cfg.task).reads_data(cfg):
        return
    try:
        resolve_shards(cfg.data.path, cfg.data.storage())
    except (FileNotFoundError, StorageError, ValueError) as error:
        raise UsageError(f"data.path: {error}") from None


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Refuse impossible values and combinations (the shared sections, then the task's own);
    ``world_size`` when it is known."""
    choices = {
        "trainer.precision": (cfg.trainer.precision, ("fp32", "bf16")),
        "trainer.device": (cfg.trainer.device, ("auto", "cpu", "cuda")),
        "parallel.zero_stage": (cfg.parallel.zero_stage, (0, 1, 2, 3)),
        "sample.sampler": (cfg.sample.sampler, ("euler", "heun")),
        "sample.guidance": (cfg.sample.guidance, ("cfg", "raag")),
        "ema.device": (cfg.ema.device, ("auto", "cpu", "cuda")),
    }
    for key, (value, valid) in choices.items():
        if value not in valid:
            raise UsageError(f"{key}: {value!r} is not one of {', '.join(map(str, valid))}")
    positive = {
        "trainer.max_steps": cfg.trainer.max_steps,
        "trainer.micro_batch_size": cfg.trainer.micro_batch_size,
        "trainer.grad_accum_steps": cfg.trainer.grad_accum_steps,
        "checkpoint.every_steps": cfg.checkpoint.every_steps,
        "trainer.log_every_steps": cfg.trainer.log_every_steps,
        "parallel.pipeline_stages": cfg.parallel.pipeline_stages,
        "optim.lr": cfg.optim.lr,
    }
    for key, value in positive.items():
        if value <= 0:
            raise UsageError(f"{key}: must be positive, got {value}")
    non_negative = {
        "checkpoint.keep_last": cfg.checkpoint.keep_last,
        "data.num_workers": cfg.data.num_workers,
        "data.shuffle_buffer": cfg.data.shuffle_buffer,
        "data.retries": cfg.data.retries,
        "optim.warmup_steps": cfg.optim.warmup_steps,
        "optim.decay_steps": cfg.optim.decay_steps,
        "trainer.sample_every_steps": cfg.trainer.sample_every_steps,
        "trainer.eval_every_steps": cfg.trainer.eval_every_steps,
        "trainer.num_threads": cfg.trainer.num_threads,
        "tracking.retry_after_s": cfg.tracking.retry_after_s,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise UsageError(f"{key}: must be >= 0, got {value}")
    if not 0.0 <= cfg.data.max_skip_fraction <= 1.0:
        raise UsageError(f"data.max_skip_fraction: must be in [0, 1], got {cfg.data.max_skip_fraction}")
    if cfg.parallel.timeout_min <= 0:
        raise UsageError(f"parallel.timeout_min: must be positive (minutes), got {cfg.parallel.timeout_min}")
    if cfg.eval.num_samples < 1:
        raise UsageError(f"eval.num_samples: must be positive, got {cfg.eval.num_samples}")
    if not cfg.eval.timesteps or not all(0.0 <= t <= 1.0 for t in cfg.eval.timesteps):
        raise UsageError(f"eval.timesteps: need at least one time in [0, 1], got {cfg.eval.timesteps}")
    if not (math.isfinite(cfg.sample.raag_alpha) and cfg.sample.raag_alpha >= 0):
        raise UsageError(f"sample.raag_alpha: RAAG's alpha must be a finite number >= 0, got {cfg.sample.raag_alpha}")
    if cfg.sample.guidance == "raag" and not (math.isfinite(cfg.sample.cfg_scale) and cfg.sample.cfg_scale >= 1):
        raise UsageError(f"sample.cfg_scale: with sample.guidance raag it is RAAG's w_max, which must be a finite "
                         f"number >= 1, got {cfg.sample.cfg_scale}")
    for key, value in cfg.tracking.tags.items():
        if not isinstance(value, str):  # a dotted override (tracking.tags.a.b=x) nests instead of naming the tag a.b
            raise UsageError(f"tracking.tags.{key}: a tag's value must be a string, got {value!r}; give a tag name "
                             f"with dots in braces: 'tracking.tags={{{key}.NAME: VALUE}}'")
    if not 0.0 <= cfg.ema.decay < 1.0:
        raise UsageError(f"ema.decay: must be in [0, 1), got {cfg.ema.decay}")
    if cfg.parallel.pipeline_stages > 1 and cfg.parallel.zero_stage > 1:
        raise UsageError(
            f"parallel.zero_stage: ZeRO stage {cfg.parallel.zero_stage} cannot be combined with "
            f"parallel.pipeline_stages={cfg.parallel.pipeline_stages} (DeepSpeed supports ZeRO 0-1 with pipeline stages)"
        )
    if world_size is not None and world_size % cfg.parallel.pipeline_stages:
        raise UsageError(
            f"parallel.pipeline_stages: {cfg.parallel.pipeline_stages} stages do not divide the world size {world_size}"
        )
    get_task_class(cfg.task).validate_config(cfg)


def to_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as plain dicts and lists (for config.yaml and MLflow params)."""
    return _plain(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))


def _plain(value: Any) -> Any:
    # Tuple-typed fields (e.g. a video tokenizer's fsq_levels) come back as tuples, which YAML's safe dumper refuses.
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value
