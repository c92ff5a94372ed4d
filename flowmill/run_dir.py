"""A run directory: the one object that knows where a run keeps what, and opens runs.

Layout of ``RUN_DIR``:

    config.yaml                the resolved config the run was started with (overrides included)
    run.json                   what the run is and how it ended (keys below)
    latest                     names the newest complete checkpoint, e.g. ``checkpoints/step-00000010``
    checkpoints/step-N/        one checkpoint; ``flowmill.json`` inside, written last, marks it complete
    samples/                   sample grids written during training
    logs/                      train.log, metrics.jsonl, keys-rank-R.jsonl
    tracking/                  undelivered.jsonl (and images/): MLflow calls not yet delivered (``flowmill runs sync``)
    text_tokenizer.model       the text tokenizer the run's text side uses (image and text runs)
    text_encoder.safetensors   the text encoder's weights (image runs with a random-weight encoder)
    teacher/, corrector/       copies of the runs a distillation depends on (config.yaml, ema.safetensors)

``run.json`` keys are a public contract: tracking_uri, experiment_id, run_id, git_commit,
world_size, task, status (running | finished | preempted | failed | killed), step (the last
step finished, written at each log interval and checkpoint and at the end), and the
timestamps; SLURM runs add slurm_job_id and slurm_folder.

A run that failed before its first checkpoint (``failed_start``) is started again by the same
command, or by ``flowmill resume``: nothing of it is worth continuing.

Everything here reads and writes files only (no torch, no DeepSpeed): ``flowmill.models``
opens runs through it too.
"""

from __future__ import annotations

import json
import shutil
import time
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from flowmill.errors import UsageError
from flowmill.files import write_atomic

CONFIG_FILE = "config.yaml"
RUN_JSON = "run.json"
LATEST = "latest"
COMPLETE_MARKER = "flowmill.json"  # in a checkpoint folder, written last
EMA_FILE = "ema.safetensors"  # in a copied teacher/corrector folder: its whole EMA weights
STEP_PREFIX = "step-"
UNIVERSAL_SUFFIX = "_universal"  # step-N_universal/: step-N in DeepSpeed's universal format (world-size change)
SOURCE_FILE = "source.json"  # written last into a copied teacher/corrector folder: the copy is complete


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def step_tag(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


class Checkpoint:
    """One complete checkpoint folder, ``RUN_DIR/checkpoints/step-N``."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @cached_property
    def meta(self) -> dict[str, Any]:
        """What the checkpoint records: step, world_size, task, family, global_batch."""
        return json.loads((self.path / COMPLETE_MARKER).read_text())

    @property
    def step(self) -> int:
        return self.meta["step"]

    @property
    def world_size(self) -> int:
        return self.meta["world_size"]

    def rank_file(self, rank: int) -> Path:
        """The per-rank state of process ``rank`` (data position, noise, RNG)."""
        return self.path / f"rank-{rank:05d}.pt"

    @property
    def universal(self) -> Path:
        """Where the universal-format copy of this checkpoint goes (for a world-size change)."""
        return self.path.with_name(self.path.name + UNIVERSAL_SUFFIX)

    @staticmethod
    def is_complete(path: Path) -> bool:
        return Path(path).name.startswith(STEP_PREFIX) and (Path(path) / COMPLETE_MARKER).is_file()


class RunDir:
    """The files of one run (see the module docstring for the layout)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    # -------------------------------------------------------------- layout

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def info_file(self) -> Path:
        return self.path / RUN_JSON

    @property
    def latest_file(self) -> Path:
        return self.path / LATEST

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def samples(self) -> Path:
        return self.path / "samples"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def train_log(self) -> Path:
        return self.logs / "train.log"

    @property
    def metrics_file(self) -> Path:
        """One JSON line per step: ``{"step": N, metric: value, ...}``."""
        return self.logs / "metrics.jsonl"

    @property
    def undelivered_file(self) -> Path:
        """The MLflow calls the run could not deliver, one JSON line each, in order (``flowmill runs sync`` sends them)."""
        return self.path / "tracking" / "undelivered.jsonl"

    def keys_file(self, rank: int) -> Path:
        """The sample keys rank ``rank`` trained on, one JSON line per step (``data.log_keys``)."""
        return self.logs / f"keys-rank-{rank}.jsonl"

    @property
    def text_tokenizer(self) -> Path:
        return self.path / "text_tokenizer.model"

    @property
    def text_encoder(self) -> Path:
        return self.path / "text_encoder.safetensors"

    @property
    def latents(self) -> Path:
        """A latent run's copy of its dataset's ``latents`` manifest section (VAE, scale): sampling needs no dataset."""
        return self.path / "latents.json"

    @property
    def teacher(self) -> Path:
        return self.path / "teacher"

    @property
    def corrector(self) -> Path:
        return self.path / "corrector"

    # -------------------------------------------------------------- opening and creating

    @classmethod
    def default(cls, name: str) -> RunDir:
        """``runs/<name>-<UTC timestamp>`` under the current directory."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        return cls(Path("runs") / f"{name}-{stamp}")

    @classmethod
    def open(cls, source: str | Path) -> tuple[RunDir, Checkpoint]:
        """A run dir (its latest checkpoint) or one of its ``checkpoints/step-*`` folders.

        Raises UsageError naming ``source`` when it is neither.
        """
        source = Path(source)
        run = cls(source)
        if run.is_run():
            return run, run.latest()
        if Checkpoint.is_complete(source) and cls(source.parent.parent).is_run():
            return cls(source.parent.parent), Checkpoint(source)
        if not source.exists():
            raise UsageError(f"{source} does not exist; pass a run dir or one of its checkpoints/step-* folders")
        raise UsageError(f"{source} is neither a flowmill run dir nor a complete checkpoint folder (checkpoints/step-*)")

    def is_run(self) -> bool:
        """Whether a run was started here (run.json and config.yaml exist)."""
        return self.info_file.is_file() and self.config_file.is_file()

    def failed_start(self) -> bool:
        """Whether a run was started here and failed before its first checkpoint: config.yaml, no
        complete checkpoint, and no run.json or one that says ``failed`` or ``killed``. Starting
        it again from scratch loses nothing."""
        if not self.config_file.is_file() or self.has_checkpoint() or any(map(Checkpoint.is_complete, self.step_dirs())):
            return False
        return not self.info_file.is_file() or self.info().get("status") in ("failed", "killed")

    def clear_failed_start(self) -> None:
        """Empty a failed start (``failed_start``) for a new attempt; logs/train.log is kept, so it
        tells every attempt's story."""
        for child in self.path.iterdir():
            if child == self.logs:
                for log_file in child.iterdir():
                    if log_file != self.train_log:
                        _remove(log_file)
            else:
                _remove(child)

    def create(self, config: dict[str, Any]) -> None:
        """Make a fresh run dir holding ``config`` (a resolved config as plain data).

        Refuses a folder that already holds a run (that is what resume is for) or anything else;
        a run that failed before its first checkpoint is started again (``failed_start``).
        """
        if self.failed_start():
            self.clear_failed_start()
        elif self.is_run():
            raise UsageError(
                f"run.dir: {self.path} already holds a run; continue it with `flowmill resume {self.path}` "
                "or choose another run.dir"
            )
        elif self.path.exists() and any(self.path.iterdir()):
            raise UsageError(f"run.dir: {self.path} exists and is not empty; choose another run.dir")
        for folder in (self.checkpoints, self.samples, self.logs):
            folder.mkdir(parents=True, exist_ok=True)
        write_atomic(self.config_file, yaml.safe_dump(config, sort_keys=False))

    # -------------------------------------------------------------- reading and recording

    def saved_config(self) -> dict[str, Any]:
        """The config the run was started with, as plain data (``config.yaml``)."""
        if not self.config_file.is_file():
            raise UsageError(f"{self.path} is not a flowmill run dir (no {CONFIG_FILE}); pass the folder a run created")
        return yaml.safe_load(self.config_file.read_text())

    def info(self) -> dict[str, Any]:
        """``run.json``; UsageError when the folder holds no run."""
        if not self.info_file.is_file():
            raise UsageError(f"{self.path} is not a flowmill run dir (no {RUN_JSON}); pass the folder a run created")
        return json.loads(self.info_file.read_text())

    def update_info(self, **fields: Any) -> dict[str, Any]:
        """Merge ``fields`` into run.json (atomically) and return the new content."""
        info = json.loads(self.info_file.read_text()) if self.info_file.is_file() else {}
        info.update(fields, updated_at=time.time())
        write_atomic(self.info_file, json.dumps(info, indent=2, sort_keys=True) + "\n")
        return info

    def refuse_changed_model(self, config: dict[str, Any], sections: tuple[str, ...] = ("task", "model", "text")) -> None:
        """Refuse to continue this run with a config whose model differs from the one its checkpoints hold."""
        saved = self.saved_config()
        for section in sections:
            old, new = saved.get(section), config.get(section)
            if old == new:
                continue
            if not isinstance(old, dict) or not isinstance(new, dict):
                raise UsageError(f"{section}: the run was trained as {old!r}, not {new!r}")
            changed = sorted(key for key in set(old) | set(new) if old.get(key) != new.get(key))
            key = changed[0]
            raise UsageError(
                f"{section}.{key}: the checkpoints in {self.path} were trained with {section}.{key}={old.get(key)!r}, "
                f"not {new.get(key)!r}; start a new run to change the model"
            )

    # -------------------------------------------------------------- checkpoints

    def step_dirs(self) -> list[Path]:
        """The checkpoint folders, oldest first; not their universal-format copies."""
        return sorted(p for p in self.checkpoints.glob(f"{STEP_PREFIX}*") if not p.name.endswith(UNIVERSAL_SUFFIX))

    def has_checkpoint(self) -> bool:
        return self.latest_file.is_file()

    def latest(self) -> Checkpoint:
        """The checkpoint ``latest`` names; UsageError saying what is wrong when there is none."""
        if not self.latest_file.is_file():
            raise UsageError(
                f"{self.path} has no checkpoint yet ({self.latest_file} is missing); start a new run with `flowmill train`"
            )
        target = self.path / self.latest_file.read_text().strip()
        if not Checkpoint.is_complete(target):
            raise UsageError(
                f"{self.latest_file} is corrupt: it names {target}, which is not a complete checkpoint; "
                f"point it at one of {[p.name for p in self.step_dirs()]} "
                "(write e.g. 'checkpoints/step-00000010' into it)"
            )
        return Checkpoint(target)

    def mark_latest(self, checkpoint: Checkpoint) -> None:
        """Point ``latest`` at ``checkpoint`` (atomically: readers see the old or the new one)."""
        write_atomic(self.latest_file, f"{checkpoint.path.relative_to(self.path)}\n")
