"""flowmill.train.loop in this process, on stand-ins for DeepSpeed's engine, the task and the data:
what is due after a step, one optimizer step over its micro-batches, the steps of a run, how a run
records its end, and the step logs cut back on resume."""

from __future__ import annotations

import contextlib
import copy
import errno
import itertools
import json
import math
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flowmill.data.pack import write_shards
from flowmill.errors import UsageError
from flowmill.run_dir import RunDir
from flowmill.train import loop, signals
from flowmill.train.config import load_config
from flowmill.train.distributed import DistEnv
from flowmill.train.job import CastInputs, Job
from flowmill.train.loop import (
    OUTCOME_STATUS,
    due,
    micro_batches,
    run_from_cli,
    run_job,
    run_steps,
    train_step,
    truncate_step_logs,
)
from flowmill.train.plan import Plan
from flowmill.train.preemption import StopRequest
from tests.helpers import TINY_CONFIG

ALONE = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


class StandInEngine:
    """DeepSpeed's engine as the loop drives it: a tiny model and SGD stepping at the accumulation
    boundary, the loss scaled by 1 / accumulation in backward."""

    def __init__(self, accumulation: int):
        torch.manual_seed(0)
        self.module = nn.Linear(2, 1)
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=0.1)
        self.accumulation = accumulation
        self.micro_steps = 0
        self.global_grad_norm: float | None = None  # what ZeRO or bf16 would report

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def get_lr(self) -> list[float]:
        return [self.optimizer.param_groups[0]["lr"]]

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accumulation).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.accumulation == 0:
            self.optimizer.step()
            self.optimizer.zero_grad()

    def get_global_grad_norm(self) -> float | None:
        return self.global_grad_norm


class StandInTask:
    """Regression of y on x; records when it is asked to evaluate and to sample."""

    def __init__(self):
        self.evaluated: list[int] = []
        self.sampled: list[int] = []

    def loss(self, forward, batch: dict, generator) -> tuple[torch.Tensor, dict]:
        return F.mse_loss(forward(batch["x"]), batch["y"]), {}

    def inputs_and_target(self, batch: dict, generator) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        return (batch["x"], batch["ids"]), batch["y"]

    def evaluate(self, model: nn.Module, step: int) -> dict:
        self.evaluated.append(step)
        return {"val/loss": float(step)}

    def log_samples(self, model: nn.Module, step: int, out_dir: Path) -> list[Path]:
        self.sampled.append(step)
        path = out_dir / f"samples-{step}.txt"
        path.write_text("a sample")
        return [path]


class Batches:
    """An endless stream of micro-batches of two samples, keys k<batch>-<sample>."""

    stats = {"skipped": 0}

    def __iter__(self):
        for index in itertools.count():
            generator = torch.Generator().manual_seed(index)
            yield {"__key__": [f"k{index}-0", f"k{index}-1"], "x": torch.randn(2, 2, generator=generator),
                   "y": torch.randn(2, 1, generator=generator), "ids": torch.tensor([index, index])}


class Recorder:
    """Stands in for the EMA, the checkpoint manager and the tracker: records every call."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.module = nn.Identity()

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))

    def named(self, name: str) -> list[tuple[tuple, dict]]:
        """(positional, keyword arguments) of each call of ``name``."""
        return [(args, kwargs) for called, args, kwargs in self.calls if called == name]


class StandInEMA(Recorder):
    """The EMA as the loop uses it: updated every step, a whole model for evaluations and samples."""

    @contextmanager
    def averaged(self, model: nn.Module):
        self.calls.append(("averaged", (model,), {}))
        yield self.module


def stand_in_job(tmp_path: Path, *overrides: str) -> Job:
    cfg = load_config(TINY_CONFIG, ["trainer.micro_batch_size=2", "trainer.grad_accum_steps=2", *overrides])
    run_dir = RunDir(tmp_path / "run")
    run_dir.create({})
    engine = StandInEngine(cfg.trainer.grad_accum_steps)
    return Job(cfg, Plan.of(cfg, run_dir, 1, resume=False), ALONE, StandInTask(), engine.module, engine,
               CastInputs(engine, torch.float32, ALONE.device), StandInEMA(), Batches(), SimpleNamespace(generator=None),
               Recorder(), Recorder(), local=None)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -------------------------------------------------------------- what is due


@pytest.mark.parametrize(
    "every, step, max_steps, expected",
    [(0, 5, 10, False), (0, 10, 10, True), (3, 3, 10, True), (3, 4, 10, False), (3, 9, 10, True), (3, 10, 10, True),
     (20, 10, 10, True)],
)
def test_due_every_n_steps_and_always_at_the_end(every, step, max_steps, expected):
    assert due(every, step, max_steps) is expected


def test_run_json_outcomes_map_to_mlflow_statuses():
    assert OUTCOME_STATUS == {"finished": "FINISHED", "killed": "KILLED", "preempted": "KILLED"}


# -------------------------------------------------------------- one optimizer step


def test_train_step_runs_every_micro_batch_and_measures_the_gradient_norm(tmp_path):
    job = stand_in_job(tmp_path)
    start = copy.deepcopy(job.engine.module)
    batches, keys = iter(job.loader), []
    loss, norm = train_step(job, batches, keys)
    assert keys == ["k0-0", "k0-1", "k1-0", "k1-1"]
    # Both micro-batches see the weights of before the step; the loss is their mean.
    first, second = [b for _, b in zip(range(2), iter(Batches()))]
    losses = [F.mse_loss(start(b["x"]), b["y"]) for b in (first, second)]
    assert loss.item() == pytest.approx(torch.stack(losses).mean().item())
    # The norm is of the accumulated gradient at the boundary, before the optimizer steps.
    torch.stack(losses).mean().backward()
    assert norm == pytest.approx(torch.nn.utils.get_total_norm([p.grad for p in start.parameters()]).item())
    assert job.engine.micro_steps == 2 and not torch.equal(start.weight, job.engine.module.weight)
    assert next(batches)["__key__"] == ["k2-0", "k2-1"]  # the next step reads on


@pytest.mark.parametrize("overrides", [["parallel.zero_stage=1"], ["trainer.precision=bf16"]])
def test_train_step_reports_the_engines_norm_when_deepspeed_keeps_one(tmp_path, overrides):
    job = stand_in_job(tmp_path, *overrides)
    assert math.isnan(train_step(job, iter(job.loader), [])[1])  # none kept yet
    job.engine.global_grad_norm = 2.5
    assert train_step(job, iter(job.loader), [])[1] == 2.5


def test_pipeline_micro_batches_are_the_steps_cast_floating_inputs_and_record_keys(tmp_path):
    job = stand_in_job(tmp_path, "trainer.grad_accum_steps=2")
    job.forward = CastInputs(job.engine, torch.bfloat16, ALONE.device)
    keys = []
    batches = iter(job.loader)
    step = micro_batches(job, batches, keys)
    assert len(step) == 2  # one step's micro-batches, made before its schedule runs
    ((x, ids), target), ((_, ids_again), _) = step
    assert (x.dtype, ids.dtype, target.dtype) == (torch.bfloat16, torch.int64, torch.float32)
    assert ids.tolist() == [0, 0] and ids_again.tolist() == [1, 1]
    assert keys == ["k0-0", "k0-1", "k1-0", "k1-1"]


# -------------------------------------------------------------- the steps of a run


def test_run_steps_logs_every_step_and_evaluates_samples_and_saves_when_due(tmp_path):
    job = stand_in_job(tmp_path, "trainer.max_steps=4", "trainer.eval_every_steps=2", "trainer.sample_every_steps=0",
                       "checkpoint.every_steps=3", "data.log_keys=true")
    assert run_steps(job, 0, StopRequest()) == (4, "finished")
    assert job.task.evaluated == [2, 4] and job.task.sampled == [4]
    assert job.tracker.named("log_artifact") == [((job.run_dir.samples / "samples-4.txt", "samples"), {})]
    meta = {"task": "mmdit", "family": "mmdit", "global_batch": 4}
    assert job.checkpoints.named("save") == [((3,), {"meta": meta}), ((4,), {"meta": meta})]
    assert len(job.ema.named("update")) == 4
    records = read_jsonl(job.run_dir.metrics_file)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert {"train/loss", "train/lr", "train/grad_norm", "train/samples_per_s", "data/skipped"} <= set(records[0])
    assert "val/loss" not in records[0] and records[1]["val/loss"] == 2.0
    assert all(math.isfinite(r["train/grad_norm"]) and r["train/grad_norm"] > 0 for r in records)
    logged = job.tracker.named("log_metrics")
    assert [kwargs for _, kwargs in logged] == [{"step": step} for step in (1, 2, 3, 4)]
    assert [metrics for (metrics,), _ in logged] == [{k: v for k, v in r.items() if k != "step"} for r in records]
    assert [r["keys"] for r in read_jsonl(job.run_dir.keys_file(0))][1] == ["k2-0", "k2-1", "k3-0", "k3-1"]


def test_run_steps_continues_from_a_restored_step(tmp_path):
    job = stand_in_job(tmp_path, "trainer.max_steps=4", "checkpoint.every_steps=10")
    assert run_steps(job, 2, StopRequest()) == (4, "finished")
    assert [r["step"] for r in read_jsonl(job.run_dir.metrics_file)] == [3, 4]
    assert [step for (step,), _ in job.checkpoints.named("save")] == [4]
    assert not job.run_dir.keys_file(0).exists()  # data.log_keys is off


def test_a_stop_request_saves_the_step_and_leaves_preempted(tmp_path):
    job = stand_in_job(tmp_path, "trainer.max_steps=4", "checkpoint.every_steps=10", "trainer.sample_every_steps=1")
    stop = StopRequest()
    stop.request("SIGUSR2")
    assert run_steps(job, 0, stop) == (1, "preempted")
    assert [step for (step,), _ in job.checkpoints.named("save")] == [1]
    assert job.task.sampled == []  # leaving as soon as the checkpoint is saved
    assert [r["step"] for r in read_jsonl(job.run_dir.metrics_file)] == [1]


# -------------------------------------------------------------- how a run records its end


@pytest.mark.parametrize(
    "outcome, status, mlflow_status",
    [((4, "finished"), "finished", "FINISHED"), ((2, "preempted"), "preempted", "KILLED"),
     (RuntimeError("boom"), "failed", "FAILED"), (KeyboardInterrupt(), "killed", "KILLED")],
)
def test_run_job_records_the_outcome_in_run_json_and_mlflow(tmp_path, monkeypatch, outcome, status, mlflow_status):
    job = stand_in_job(tmp_path, "trainer.max_steps=4")

    def stand_in_steps(job, step, stop):
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    monkeypatch.setattr(loop, "run_steps", stand_in_steps)
    if isinstance(outcome, BaseException):
        with pytest.raises(type(outcome)):
            run_job(job, 1, StopRequest())
        step = 1
    else:
        assert run_job(job, 1, StopRequest()) == status
        step = outcome[0]
    info = job.run_dir.info()
    assert (info["status"], info["step"]) == (status, step)
    assert job.tracker.named("finish") == [((mlflow_status,), {})]


class FailingBatches(Batches):
    """Batches that fail after ``good`` micro-batches, noting the step run.json holds at that moment."""

    def __init__(self, run_dir: RunDir, good: int):
        self.run_dir, self.good, self.step_at_failure = run_dir, good, None

    def __iter__(self):
        for index, batch in enumerate(super().__iter__()):
            if index == self.good:
                self.step_at_failure = self.run_dir.info()["step"]
                raise OSError("disk gone")
            yield batch


def test_run_json_step_follows_the_run_and_stays_at_the_last_step_after_a_failure(tmp_path):
    job = stand_in_job(tmp_path, "trainer.max_steps=8", "trainer.log_every_steps=2", "checkpoint.every_steps=100")
    job.run_dir.update_info(status="running", step=0)
    job.loader = FailingBatches(job.run_dir, good=7)  # 2 micro-batches a step: step 4 fails
    with pytest.raises(OSError, match="disk gone"):
        run_job(job, 0, StopRequest())
    assert job.loader.step_at_failure == 2  # updated at the log interval while running
    info = job.run_dir.info()
    assert (info["status"], info["step"]) == ("failed", 3)


def test_a_full_disk_while_saving_is_named_with_rank_checkpoint_and_run_dir(tmp_path, monkeypatch):
    job = stand_in_job(tmp_path, "trainer.max_steps=4", "checkpoint.every_steps=2")
    job.run_dir.update_info(status="running", step=0)

    def full_disk(step, meta):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(job.checkpoints, "save", full_disk, raising=False)
    with pytest.raises(loop.CheckpointError) as failed:
        run_job(job, 0, StopRequest())
    assert str(failed.value) == f"rank 0: no space left on device while saving checkpoint step-00000002 in {job.run_dir}"
    assert job.run_dir.info()["status"] == "failed"


def test_run_job_cuts_the_step_logs_back_to_the_restored_step(tmp_path, monkeypatch):
    job = stand_in_job(tmp_path)
    for path in (job.run_dir.metrics_file, job.run_dir.keys_file(0), job.run_dir.keys_file(1)):
        path.write_text("".join(json.dumps({"step": step}) + "\n" for step in range(1, 6)))
    monkeypatch.setattr(loop, "run_steps", lambda job, step, stop: (step, "finished"))
    run_job(job, 3, StopRequest())
    assert [r["step"] for r in read_jsonl(job.run_dir.metrics_file)] == [1, 2, 3]
    assert [r["step"] for r in read_jsonl(job.run_dir.keys_file(0))] == [1, 2, 3]
    assert len(read_jsonl(job.run_dir.keys_file(1))) == 5  # another rank's keys are its own to cut


def test_truncate_step_logs(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n\n{"step": 2, "train/loss": 0.5}\n{"step": 3}\n')
    truncate_step_logs(path, after_step=2)
    assert path.read_text() == '{"step": 1}\n{"step": 2, "train/loss": 0.5}\n'
    truncate_step_logs(path, after_step=0)
    assert path.read_text() == ""
    truncate_step_logs(tmp_path / "missing.jsonl", after_step=3)
    assert not (tmp_path / "missing.jsonl").exists()


def test_resuming_a_folder_that_holds_no_run_is_refused(tmp_path):
    with pytest.raises(UsageError, match="is not a flowmill run dir \\(no run.json/config.yaml\\)"):
        run_from_cli(None, [], str(tmp_path))


# -------------------------------------------------------------- a run that fails before its first checkpoint


@pytest.fixture
def lone_train(monkeypatch):
    """``loop.train`` without a process group (a lone process), its job build replaced by a failure
    that records whether the run would resume."""
    monkeypatch.setattr(loop, "init_distributed", lambda device, timeout_min: ALONE)
    monkeypatch.setattr(loop, "shutdown", lambda clean: None)
    builds = []

    def failing_build(cfg, plan, env, run_info):
        builds.append(plan.resume)
        raise RuntimeError("the model does not fit")

    monkeypatch.setattr(loop, "build_job", failing_build)
    return builds


def test_a_failed_start_leaves_a_run_dir_the_same_command_and_resume_accept(tmp_path, lone_train, capsys):
    write_shards([{"__key__": f"k{i}", "txt": "x"} for i in range(4)], tmp_path / "data", source="test", args={},
                 shard_samples=2, progress=False)
    run = tmp_path / "run"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    for data, message in ((tmp_path / "nowhere", "data.path: .*nowhere"), (broken, f"data.path: {broken / 'manifest.json'} is not valid JSON")):
        with pytest.raises(UsageError, match=message):
            loop.train(load_config(TINY_CONFIG, [f"data.path={data}", f"run.dir={run}"]))
        assert not run.exists()  # refused before the run dir is made
    cfg = load_config(TINY_CONFIG, [f"data.path={tmp_path / 'data'}", f"run.dir={run}"])
    capsys.readouterr()
    for _ in range(2):  # the same command again: the half-made run dir is taken, not refused
        with pytest.raises(RuntimeError, match="the model does not fit"):
            loop.train(cfg)
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"[flowmill rank 0] fatal: RuntimeError: the model does not fit (traceback in {run / 'logs' / 'train.log'})")
    with pytest.raises(RuntimeError, match="the model does not fit"):
        run_from_cli(None, [], str(run))  # flowmill resume: nothing to continue, so it starts again
    assert lone_train == [False, False, False]
    log = (run / "logs" / "train.log").read_text()
    assert log.count("ERROR rank 0: the run stopped (failed): RuntimeError: the model does not fit") == 3
    assert "Traceback (most recent call last)" in log and "failing_build" in log
    assert RunDir(run).failed_start() and (run / "config.yaml").is_file()


def test_an_error_after_a_stop_signal_ends_the_run_stopped_not_failed(tmp_path, lone_train, monkeypatch, capsys):
    """Python drops an exception raised where it cannot propagate (a garbage collector's callback the
    signal interrupted); what fails next (a collective whose peer stopped) is the stop's doing."""
    monkeypatch.setattr(signals, "EXIT_AFTER_S", 1e6)  # the hard exit a stuck process gets must not end pytest

    def stopped_then_failing(cfg, plan, env, run_info):
        with contextlib.suppress(signals.Stopped):  # as where Python drops it
            signal.raise_signal(signal.SIGTERM)  # to this thread: the handler runs before the next line
            time.sleep(5)
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(loop, "build_job", stopped_then_failing)
    write_shards([{"__key__": f"k{i}", "txt": "x"} for i in range(4)], tmp_path / "data", source="test", args={},
                 shard_samples=2, progress=False)
    run = tmp_path / "run"
    with pytest.raises(signals.Stopped, match="received SIGTERM"), signals.stopping_on_signals():
        loop.train(load_config(TINY_CONFIG, [f"data.path={tmp_path / 'data'}", f"run.dir={run}"]))
    assert "fatal" not in capsys.readouterr().err
    assert "ERROR rank 0: the run stopped (killed): Stopped: received SIGTERM" in (run / "logs" / "train.log").read_text()
