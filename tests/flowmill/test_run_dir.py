"""The run-dir object: layout, creating a run, opening a run dir or a checkpoint folder, run.json."""

from __future__ import annotations

import json

import pytest

from flowmill.errors import UsageError
from flowmill.run_dir import COMPLETE_MARKER, Checkpoint, RunDir, step_tag


def fake_checkpoint(run: RunDir, step: int, world_size: int = 1) -> Checkpoint:
    checkpoint = Checkpoint(run.checkpoints / step_tag(step))
    checkpoint.path.mkdir(parents=True)
    (checkpoint.path / COMPLETE_MARKER).write_text(json.dumps({"step": step, "world_size": world_size, "family": "mmdit"}))
    return checkpoint


@pytest.fixture
def run(tmp_path) -> RunDir:
    run = RunDir(tmp_path / "run")
    run.create({"task": "mmdit", "model": {"depth": 2}})
    run.update_info(status="running", world_size=1)
    return run


def test_create_writes_the_config_and_the_folders(run):
    assert run.saved_config() == {"task": "mmdit", "model": {"depth": 2}}
    assert run.checkpoints.is_dir() and run.samples.is_dir() and run.logs.is_dir()
    assert run.is_run() and not run.has_checkpoint()


def test_create_refuses_a_run_or_a_non_empty_folder(run, tmp_path):
    with pytest.raises(UsageError, match=r"run.dir: .* already holds a run; continue it with `flowmill resume"):
        run.create({"task": "mmdit"})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="exists and is not empty"):
        RunDir(tmp_path / "other").create({})


def test_a_run_that_failed_before_its_first_checkpoint_is_started_again(tmp_path):
    run = RunDir(tmp_path / "run")
    run.create({"task": "mmdit", "model": {"depth": 2}})
    run.train_log.write_text("the first attempt's story\n")
    run.text_tokenizer.write_text("tokenizer")
    (run.checkpoints / step_tag(5)).mkdir()  # a save that never completed
    assert run.failed_start()  # no run.json: it failed while building
    run.create({"task": "mmdit", "model": {"depth": 3}})
    assert run.saved_config()["model"] == {"depth": 3} and not run.text_tokenizer.exists()
    assert run.step_dirs() == [] and run.train_log.read_text() == "the first attempt's story\n"
    run.update_info(status="running")
    assert not run.failed_start()  # it may be running now
    run.update_info(status="failed")
    assert run.failed_start()
    run.mark_latest(fake_checkpoint(run, 2))
    assert not run.failed_start()
    with pytest.raises(UsageError, match="already holds a run"):
        run.create({})


def test_update_info_merges_fields_and_leaves_no_temporary_file(run):
    run.update_info(step=7)
    info = run.info()
    assert info["status"] == "running" and info["step"] == 7 and "updated_at" in info
    assert sorted(p.name for p in run.path.iterdir() if p.is_file()) == ["config.yaml", "run.json"]


def test_open_a_run_dir_gives_its_latest_checkpoint(run):
    fake_checkpoint(run, 2)
    newest = fake_checkpoint(run, 4)
    run.mark_latest(newest)
    opened, checkpoint = RunDir.open(run.path)
    assert opened.path == run.path and checkpoint.path == newest.path and checkpoint.step == 4
    assert run.latest_file.read_text() == "checkpoints/step-00000004\n"


def test_open_a_checkpoint_folder_gives_its_run(run):
    older = fake_checkpoint(run, 2)
    run.mark_latest(fake_checkpoint(run, 4))
    opened, checkpoint = RunDir.open(older.path)
    assert opened.path == run.path and checkpoint.step == 2


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp / "nowhere", "does not exist"),
    (lambda tmp: tmp, "is neither a flowmill run dir nor a complete checkpoint folder"),
])
def test_open_refuses_what_is_not_a_run(tmp_path, make, message):
    with pytest.raises(UsageError, match=message):
        RunDir.open(make(tmp_path))


def test_a_run_without_checkpoint_or_with_a_corrupt_latest_says_what_to_do(run):
    with pytest.raises(UsageError, match="has no checkpoint yet"):
        run.latest()
    fake_checkpoint(run, 2)
    run.latest_file.write_text("checkpoints/step-00000009\n")
    with pytest.raises(UsageError, match=r"is corrupt: .* point it at one of \['step-00000002'\]"):
        run.latest()


def test_a_half_written_checkpoint_is_not_complete(run):
    half = run.checkpoints / step_tag(3)
    half.mkdir()
    assert not Checkpoint.is_complete(half)
    assert [p.name for p in run.step_dirs()] == ["step-00000003"]


def test_refuse_changed_model_names_the_key(run):
    run.refuse_changed_model({"task": "mmdit", "model": {"depth": 2}, "optim": {"lr": 1.0}})
    with pytest.raises(UsageError, match=r"model.depth: .* trained with model.depth=2, not 3; start a new run"):
        run.refuse_changed_model({"task": "mmdit", "model": {"depth": 3}})
    with pytest.raises(UsageError, match="task: the run was trained as 'mmdit', not 'flm'"):
        run.refuse_changed_model({"task": "flm", "model": {"depth": 2}})


def test_what_is_not_a_run_has_no_info_or_config(tmp_path):
    with pytest.raises(UsageError, match="is not a flowmill run dir"):
        RunDir(tmp_path).info()
    with pytest.raises(UsageError, match="is not a flowmill run dir"):
        RunDir(tmp_path).saved_config()
