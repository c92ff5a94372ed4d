"""flowmill.train.tasks.base: what every task inherits (the loss from inputs, target and criterion;
the fixed first batch of a dataset; no samples and no metrics unless a task writes them) and the
task registry."""

from __future__ import annotations

import tarfile

import pytest
import torch
from torch import nn

from flowmill.run_dir import RunDir
from flowmill.train.config import Config
from flowmill.train.distributed import DistEnv
from flowmill.train.tasks import TASKS, get_task_class
from flowmill.train.tasks.base import Task

ALONE = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


class Regression(Task):
    """A task that maps a sample's label to a target; enough to use what Task gives."""

    def decoder(self):
        return lambda sample: {"cls": int(sample["cls"])}

    def inputs_and_target(self, batch, generator):
        x = batch["cls"].float()[:, None]
        return (x,), 2 * x + torch.rand(x.shape, generator=generator)

    def criterion(self, output, target):
        return (output - target).abs().mean()


def test_the_loss_is_the_criterion_of_the_models_output_and_draws_from_the_generator(tmp_path):
    task = Regression(Config(), ALONE, RunDir(tmp_path))
    model = nn.Linear(1, 1)
    batch = {"cls": torch.tensor([1, 2, 3])}
    loss, metrics = task.loss(model, batch, torch.Generator().manual_seed(0))
    (x,), target = task.inputs_and_target(batch, torch.Generator().manual_seed(0))
    assert metrics == {} and torch.equal(loss, task.criterion(model(x), target))
    assert not torch.equal(loss, task.loss(model, batch, torch.Generator().manual_seed(1))[0])


def test_without_its_own_a_task_logs_no_samples_and_no_metrics(tmp_path):
    task = Regression(Config(), ALONE, RunDir(tmp_path))
    Regression.validate_config(Config())
    task.prepare_run_dir()
    assert task.evaluate(nn.Linear(1, 1), 5) == {} and task.log_samples(nn.Linear(1, 1), 5, tmp_path) == []
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(NotImplementedError):
        Task(Config(), ALONE, RunDir(tmp_path)).build_model()


def test_first_batch_is_fixed_and_opens_one_shard_in_file_order(digits_dir, tmp_path):
    """The held-out batch of every evaluation: the same samples each time, the first of the shard
    that epoch 0 (seed 0) reads first."""
    task = Regression(Config(), ALONE, RunDir(tmp_path))
    batch = task.first_batch(str(digits_dir), 5)
    assert batch["__key__"] == task.first_batch(str(digits_dir), 5)["__key__"]
    openings = {}
    for shard in digits_dir.glob("*.tar"):
        with tarfile.open(shard) as tar:
            names = [member.name for member in tar if member.name.endswith(".cls")][:5]
            openings[tuple(name.removesuffix(".cls") for name in names)] = [int(tar.extractfile(n).read()) for n in names]
    assert tuple(batch["__key__"]) in openings
    assert batch["cls"].tolist() == openings[tuple(batch["__key__"])]


def test_every_registered_task_imports_and_an_unknown_one_lists_them():
    for name in TASKS:
        task = get_task_class(name)
        assert issubclass(task, Task) and task.family and issubclass(task.config_class, Config)
        assert task.config_class().task == name
    with pytest.raises(KeyError, match="unknown task 'nope'; choose one of: autoencoder, flm, fmlm, mdlm, mmdit, mmdit_flowmap, video_tokenizer"):
        get_task_class("nope")
