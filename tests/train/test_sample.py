"""flowmill.train.sample: a run's task and EMA model opened in this process, and the counts and
sources `flowmill sample` refuses (what each task writes is in tests/train/tasks/)."""

from __future__ import annotations

import argparse
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file

from flowmill.errors import UsageError
from flowmill.models import load_model
from flowmill.models.mmdit import MMDiT
from flowmill.run_dir import RunDir
from flowmill.train.config import load_config
from flowmill.train.distributed import DistEnv, choose_device
from flowmill.train.sample import check_counts, load_task_and_model, run_task, sample_model_folder
from flowmill.train.tasks.mmdit import MMDiTTask
from flowmill.weights import read_ema
from tests.helpers import TINY_CONFIG, flowmill_ok, tiny_overrides


@pytest.mark.parametrize(
    "num_samples, steps, message",
    [(1, 1, None), (4, 25, None), (0, 25, "--num-samples: must be at least 1, got 0"),
     (4, 0, "--steps: must be at least 1, got 0"), (-2, -1, "--num-samples: must be at least 1, got -2")],
)
def test_check_counts(num_samples, steps, message):
    args = argparse.Namespace(num_samples=num_samples, steps=steps)
    if message is None:
        check_counts(args)
    else:
        with pytest.raises(UsageError, match=f"^{message}$"):
            check_counts(args)


def test_run_task_is_the_runs_task_alone_on_this_device_with_its_own_text_side(finished_run):
    run = RunDir(finished_run)
    task = run_task(run)
    assert isinstance(task, MMDiTTask) and task.run_dir is run
    assert task.cfg == load_config(None, [], base=run.saved_config())
    assert task.env == DistEnv(rank=0, local_rank=0, world_size=1, device=choose_device(task.cfg.trainer.device))
    # The text tokenizer and encoder weights the run saved, not the dataset's files.
    assert task.text_tokenizer_path == str(run.text_tokenizer)
    saved = load_file(run.text_encoder)
    assert all(torch.equal(task.text_encoder.state_dict()[name], tensor) for name, tensor in saved.items())


def test_run_task_needs_no_dataset(finished_run, tmp_path):
    """A run dir copied elsewhere (no checkpoints, the dataset gone) still gives its task."""
    run = RunDir(tmp_path / "copy")
    run.path.mkdir()
    source = RunDir(finished_run)
    for name in ("run.json", "text_tokenizer.model", "text_encoder.safetensors"):
        shutil.copyfile(source.path / name, run.path / name)
    config = source.saved_config()
    config["text"]["tokenizer"] = config["data"]["path"] = str(tmp_path / "gone")
    run.config_file.write_text(yaml.safe_dump(config))
    assert run_task(run).prompts(["a handwritten digit one"])[0].shape[0] == 1


def test_load_task_and_model_gives_the_ema_weights_of_the_latest_or_the_named_checkpoint(finished_run):
    task, model, checkpoint = load_task_and_model(finished_run)
    assert isinstance(task, MMDiTTask) and isinstance(model, MMDiT) and not model.training
    assert checkpoint.step == 4 and checkpoint.path == finished_run / "checkpoints" / "step-00000004"
    ema = read_ema(checkpoint)
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in ema.items())
    _, earlier, checkpoint = load_task_and_model(finished_run / "checkpoints" / "step-00000002")
    assert checkpoint.step == 2
    assert not torch.equal(earlier.final.linear.weight, model.final.linear.weight)


def test_a_model_folder_needs_a_run_for_its_text_side(tmp_path):
    args = argparse.Namespace(source=str(tmp_path), text_from=None, num_samples=1, steps=1)
    with pytest.raises(UsageError, match="^--text-from: .* is a model folder, which holds no text encoder; pass "
                                         "--text-from RUN_DIR"):
        sample_model_folder(args)


def test_an_unknown_source_is_refused(tmp_path):
    with pytest.raises(UsageError, match="does not exist; pass a run dir or one of its checkpoints/step-\\* folders"):
        load_task_and_model(tmp_path / "nowhere")


@pytest.mark.slow
def test_a_run_without_ema_samples_with_its_trained_weights(digits_dir, tmp_path):
    run_dir = tmp_path / "run"
    flowmill_ok("train", str(TINY_CONFIG), *tiny_overrides(digits_dir, run_dir, **{
        "ema.enabled": "false", "trainer.max_steps": 2, "checkpoint.every_steps": 2, "trainer.sample_every_steps": 2}),
        cwd=tmp_path)
    checkpoint = RunDir(run_dir).latest()
    assert not list(checkpoint.path.glob("ema-rank-*")) and list((run_dir / "samples").glob("grid-*.png"))
    task, model, _ = load_task_and_model(run_dir)
    trained = torch.load(checkpoint.path / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert all(torch.equal(model.state_dict()[name], tensor.float()) for name, tensor in trained.items())
    with pytest.raises(UsageError, match=r"holds no EMA weights \(the run trained with ema.enabled=false\)"):
        load_model(run_dir)
