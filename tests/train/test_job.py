"""flowmill.train.job's pieces, in this process without DeepSpeed: opening the run dir, the plan of a
resume, SLURM tags, threads, the input cast and the schedule of an extended run."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from torch import nn

from flowmill.errors import UsageError
from flowmill.run_dir import COMPLETE_MARKER, Checkpoint, RunDir, step_tag
from flowmill.train.config import load_config
from flowmill.train.distributed import DistEnv
from flowmill.train.engine import lr_lambda
from flowmill.train.job import (
    CastInputs,
    agree,
    make_plan,
    open_run_dir,
    reschedule,
    slurm_tags,
    start_tracker,
    threads_per_process,
)
from flowmill.train.plan import Plan
from flowmill.train.tracking import NullTracker
from tests.helpers import TINY_CONFIG

ALONE = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def config(*overrides: str):
    return load_config(TINY_CONFIG, list(overrides))


def started_run(path, cfg, world_size: int, global_batch: int, step: int = 4) -> RunDir:
    """A run dir opened for ``cfg`` with one complete checkpoint saved by ``world_size`` processes."""
    run = open_run_dir(cfg, ALONE, RunDir(path), resume=False)
    run.update_info(status="preempted", world_size=world_size)
    checkpoint = Checkpoint(run.checkpoints / step_tag(step))
    checkpoint.path.mkdir(parents=True)
    meta = {"step": step, "world_size": world_size, "family": "mmdit", "task": "mmdit", "global_batch": global_batch}
    (checkpoint.path / COMPLETE_MARKER).write_text(json.dumps(meta))
    run.mark_latest(checkpoint)
    return run


# -------------------------------------------------------------- the run dir


def test_open_run_dir_creates_a_fresh_run_dir_holding_the_config(tmp_path):
    cfg = config(f"run.dir={tmp_path / 'run'}")
    run = open_run_dir(cfg, ALONE, None, resume=False)
    assert run.path == tmp_path / "run"
    assert run.saved_config()["model"]["depth"] == cfg.model.depth
    assert run.checkpoints.is_dir() and run.logs.is_dir() and run.samples.is_dir()
    # An explicit run dir (a resumed run's own folder) wins over run.dir.
    assert open_run_dir(cfg, ALONE, RunDir(tmp_path / "other"), resume=False).path == tmp_path / "other"


def test_open_run_dir_without_run_dir_makes_a_timestamped_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = open_run_dir(config("run.name=digits"), ALONE, None, resume=False)
    assert run.path.parent == Path("runs") and run.path.name.startswith("digits-")
    assert (tmp_path / run.path / "config.yaml").is_file()


def test_open_run_dir_refuses_a_run_dir_holding_a_run(tmp_path):
    cfg = config(f"run.dir={tmp_path / 'run'}")
    open_run_dir(cfg, ALONE, None, resume=False).update_info(status="finished")
    before = (tmp_path / "run" / "config.yaml").read_text()
    with pytest.raises(UsageError, match=r"run.dir: .* already holds a run; continue it with `flowmill resume"):
        open_run_dir(config(f"run.dir={tmp_path / 'run'}", "optim.lr=1"), ALONE, None, resume=False)
    assert (tmp_path / "run" / "config.yaml").read_text() == before


def test_open_run_dir_on_resume_refuses_a_changed_model_naming_the_key(tmp_path):
    cfg = config(f"run.dir={tmp_path / 'run'}", "model.depth=2")
    run = open_run_dir(cfg, ALONE, None, resume=False)
    run.update_info(status="preempted")
    # What the model does not depend on may change on resume.
    assert open_run_dir(config(f"run.dir={tmp_path / 'run'}", "model.depth=2", "trainer.max_steps=99"), ALONE, run,
                        resume=True).path == run.path
    with pytest.raises(UsageError, match=r"^model.depth: the checkpoints in .* were trained with model.depth=2, not 3; "
                                         "start a new run"):
        open_run_dir(config("model.depth=3"), ALONE, run, resume=True)


def test_agree_alone_is_the_value_itself():
    value = ("runs/x", None)
    assert agree(ALONE, value) is value


# -------------------------------------------------------------- the plan


def test_a_resume_on_another_world_size_keeps_the_global_batch_without_changing_the_config(tmp_path):
    cfg = config("trainer.micro_batch_size=8", "trainer.grad_accum_steps=1")
    run = started_run(tmp_path / "run", cfg, world_size=2, global_batch=16)
    before = copy.deepcopy(cfg)
    plan = make_plan(cfg, ALONE, run, resume=True)
    assert (plan.micro_batch_size, plan.grad_accum_steps, plan.global_batch_size) == (8, 2, 16)
    assert plan.resume and plan.run_dir == run and plan.world_size == 1
    assert cfg == before and cfg.trainer.micro_batch_size == 8 and cfg.trainer.grad_accum_steps == 1
    assert plan.params()["derived.grad_accum_steps"] == "2"


def test_a_resume_on_the_same_world_size_or_a_new_run_plans_the_config_as_written(tmp_path):
    cfg = config("trainer.micro_batch_size=8")
    run = started_run(tmp_path / "run", cfg, world_size=1, global_batch=999)  # same world size: meta not read
    assert make_plan(cfg, ALONE, run, resume=True) == Plan.of(cfg, run, 1, resume=True)
    assert make_plan(cfg, ALONE, run, resume=False) == Plan.of(cfg, run, 1, resume=False)


# -------------------------------------------------------------- tags, threads, tracking


@pytest.fixture
def no_slurm(monkeypatch):
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_slurm_tags_outside_slurm_are_the_sweep_only(no_slurm):
    assert slurm_tags(config()) == {}
    assert slurm_tags(config("run.sweep_id=sw1")) == {"flowmill.sweep_id": "sw1"}


def test_slurm_tags_name_the_job_or_the_array_element(no_slurm):
    no_slurm.setenv("SLURM_JOB_ID", "4242")
    assert slurm_tags(config()) == {"flowmill.slurm_job_id": "4242"}
    # submitit's name of an array element, not the element's own job id.
    no_slurm.setenv("SLURM_ARRAY_JOB_ID", "77")
    no_slurm.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert slurm_tags(config("run.sweep_id=sw1")) == {"flowmill.sweep_id": "sw1", "flowmill.slurm_job_id": "77_3"}


@pytest.mark.parametrize(
    "num_threads, environ, expected",
    [
        (3, {"LOCAL_WORLD_SIZE": "4"}, 3),  # trainer.num_threads wins
        (0, {"LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "8"}, 2),  # 8 cores over the 4 processes on this machine
        (0, {"WORLD_SIZE": "2"}, 4),  # without LOCAL_WORLD_SIZE, the job's processes
        (0, {}, 8),  # alone
        (0, {"LOCAL_WORLD_SIZE": "16"}, 1),  # never fewer than one
    ],
)
def test_threads_per_process(monkeypatch, num_threads, environ, expected):
    for name in ("LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("flowmill.train.job.os.cpu_count", lambda: 8)
    assert threads_per_process(config(f"trainer.num_threads={num_threads}")) == expected


def test_only_rank_0_tracks(tmp_path):
    cfg = config()
    plan = Plan.of(cfg, RunDir(tmp_path / "run"), world_size=2, resume=False)
    tracker = start_tracker(cfg, plan, DistEnv(rank=1, local_rank=1, world_size=2, device=torch.device("cpu")), {})
    assert isinstance(tracker, NullTracker)
    assert not (tmp_path / "run").exists() and not (tmp_path / "mlflow.db").exists()


class StartedTracker(NullTracker):
    """What ``MLflowTracker.start`` was asked for, and what was logged into it."""

    def __init__(self, uri: str, **options):
        super().__init__(tracking_uri=uri)
        self.options = options
        self.params: dict[str, str] = {}
        self.texts: dict[str, str] = {}

    def log_params(self, flat):
        self.params.update(flat)

    def log_text(self, text, artifact_file):
        self.texts[artifact_file] = text


def test_the_mlflow_run_is_named_after_the_run_dir_and_carries_tags_description_and_config(tmp_path, monkeypatch):
    monkeypatch.setattr("flowmill.train.job.MLflowTracker.start", StartedTracker)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    cfg = config("run.name=digits", "tracking.tags={team: vision, flowmill.task: mine}", "tracking.description=a *note*")
    run = open_run_dir(cfg, ALONE, RunDir(tmp_path / "digits-sweep1-3"), resume=False)
    tracker = start_tracker(cfg, Plan.of(cfg, run, world_size=1, resume=False), ALONE, {"flowmill.git_commit": "abc"})
    assert tracker.tracking_uri == "http://mlflow.example:5000"  # $MLFLOW_TRACKING_URI, as tracking.uri is unset
    assert tracker.options["run_name"] == "digits-sweep1-3" and tracker.options["description"] == "a *note*"
    tags = tracker.options["tags"]
    assert tags["team"] == "vision" and tags["flowmill.task"] == "mmdit"  # flowmill's own tags win over the user's
    assert tags["flowmill.run_name"] == "digits" and tags["flowmill.git_commit"] == "abc"
    assert yaml.safe_load(tracker.texts["config.yaml"]) == yaml.safe_load(run.config_file.read_text())
    assert tracker.params["run.name"] == "digits"

    cfg = config("tracking.uri=sqlite:///elsewhere.db")
    run = open_run_dir(cfg, ALONE, RunDir(tmp_path / "second"), resume=False)
    assert start_tracker(cfg, Plan.of(cfg, run, world_size=1, resume=False), ALONE, {}).tracking_uri == "sqlite:///elsewhere.db"


# -------------------------------------------------------------- the input cast


class Recording:
    """Returns what it was called with, and whether autocast was on."""

    def __call__(self, *args):
        return args, torch.is_autocast_enabled("cpu")


def test_cast_inputs_casts_floating_inputs_and_leaves_integers():
    img, t, ids = torch.randn(2, 1, 4, 4), torch.rand(2), torch.tensor([[1, 2], [3, 4]])
    (args, autocast) = CastInputs(Recording(), torch.bfloat16, torch.device("cpu"))(img, t, ids)
    assert [a.dtype for a in args] == [torch.bfloat16, torch.bfloat16, torch.int64]
    assert torch.equal(args[2], ids) and torch.equal(args[0], img.to(torch.bfloat16))
    assert autocast  # bf16 weights run under autocast
    (args, autocast) = CastInputs(Recording(), torch.float32, torch.device("cpu"))(img.double(), ids)
    assert [a.dtype for a in args] == [torch.float32, torch.int64] and not autocast


# -------------------------------------------------------------- the schedule of a resumed run


def scheduler_at(cfg, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """An optimizer of a tiny model on ``cfg``'s schedule, after ``steps`` optimizer steps."""
    optimizer = torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=cfg.optim.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    for _ in range(steps):
        step(scheduler)
    return scheduler


def step(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    scheduler.optimizer.step()
    scheduler.step()


def test_reschedule_continues_a_longer_run_on_the_new_curve():
    short, long = config("trainer.max_steps=10", "optim.lr=1e-3"), config("trainer.max_steps=20", "optim.lr=1e-3")
    restored = scheduler_at(short, 6)  # what a checkpoint of the 10-step run restores
    reference = scheduler_at(long, 6)  # the 20-step run at the same step
    assert restored.get_last_lr() != pytest.approx(reference.get_last_lr())
    reschedule(SimpleNamespace(lr_scheduler=restored), long)
    assert restored.last_epoch == 6
    assert restored.get_last_lr() == pytest.approx(reference.get_last_lr())
    assert restored.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * lr_lambda(long)(6))
    for _ in range(3):
        step(restored)
        step(reference)
        assert restored.get_last_lr() == pytest.approx(reference.get_last_lr())
