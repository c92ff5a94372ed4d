"""flowmill.train.commands: what the handlers of `train`, `sample`, `reconstruct` and `judge` refuse
before any work, through the CLI in this process (the work itself is in tests/train/tasks/)."""

from __future__ import annotations

import pytest

from flowmill.cli import main
from flowmill.train import commands
from tests.helpers import TINY_CONFIG

# `train` is wrapped in torch elastic's @record, which cannot install its fault handler on pytest's captured stderr.
pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    assert captured.out == ""
    return code, captured.err


def test_train_needs_a_config(capsys):
    assert run_cli(capsys, "train") == (2, "flowmill: error: pass a CONFIG file (or --resume RUN_DIR)\n")


def test_train_resume_takes_overrides_not_a_config(capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(commands, "run_from_cli", lambda *args: calls.append(args))
    # argparse hands the first override to the optional CONFIG positional; the handler gives it back.
    assert main(["train", "--resume", "runs/a", "trainer.max_steps=6", "optim.lr=1"]) == 0
    assert calls == [(None, ["trainer.max_steps=6", "optim.lr=1"], "runs/a")]
    code, err = run_cli(capsys, "train", "--resume", "runs/a", "other.yaml")
    assert code == 2 and err == "flowmill: error: --resume continues with the run's own config.yaml; drop other.yaml\n"
    assert len(calls) == 1


def test_sample_of_a_run_refuses_text_from(tmp_path, capsys):
    code, err = run_cli(capsys, "sample", tmp_path, "--text-from", tmp_path, "--prompt", "x", "--out", tmp_path / "o")
    assert code == 2 and "--text-from: only a model folder needs it" in err


def test_reconstruct_needs_a_video_tokenizer_run(finished_run, tmp_path, capsys):
    code, err = run_cli(capsys, "reconstruct", finished_run, tmp_path / "clip.npy", "--num-tokens", "1", "--out", tmp_path / "o")
    assert code == 2 and "trains a 'mmdit' model; reconstruct needs a video tokenizer run" in err
    assert not (tmp_path / "o").exists()


def test_judge_needs_a_text_config(capsys):
    code, err = run_cli(capsys, "judge", TINY_CONFIG)
    assert code == 2 and err == f"flowmill: error: {TINY_CONFIG}: task mmdit has no judge section; give an flm or fmlm config\n"


@pytest.mark.parametrize("argv", [["sample", "RUN", "--out", "o", "--steps", "0"], ["sample", "RUN", "--out", "o", "--num-samples", "0"]])
def test_sample_counts_are_checked_before_the_run_is_read(argv, capsys):
    code, err = run_cli(capsys, *argv)
    assert code == 2 and "must be at least 1, got 0" in err


@pytest.mark.parametrize(
    "flags, message",
    [(["--guidance", "raga"], "--guidance: unknown guidance 'raga'; choose one of: cfg, raag"),
     (["--raag-alpha", "-1"], "--raag-alpha: RAAG's alpha must be a finite number >= 0, got -1"),
     (["--guidance", "raag", "--raag-alpha", "nan"], "--raag-alpha: RAAG's alpha must be a finite number >= 0, got nan"),
     (["--guidance", "raag", "--cfg", "0.5"], "--cfg: with --guidance raag it is RAAG's w_max, which must be a finite number >= 1, got 0.5")],
)
def test_sample_guidance_is_checked_before_the_run_is_read(flags, message, tmp_path, capsys):
    code, err = run_cli(capsys, "sample", tmp_path / "missing", "--prompt", "x", "--out", tmp_path / "o", *flags)
    assert (code, err) == (2, f"flowmill: error: {message}\n")
    model_folder = tmp_path / "model"  # a model folder's own checks come before its files are read
    model_folder.mkdir()
    (model_folder / "flowmill_model.json").write_text("{}")
    code, err = run_cli(capsys, "sample", model_folder, "--text-from", tmp_path / "run", "--prompt", "x",
                        "--out", tmp_path / "o", *flags)
    assert (code, err) == (2, f"flowmill: error: {message}\n")
