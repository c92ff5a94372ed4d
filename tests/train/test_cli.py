"""flowmill.train.cli: the parsers of `train`, `sample`, `reconstruct`, `import`, `export` and `judge`
give their handlers what they read (handlers and heavy imports: tests/flowmill/test_cli.py)."""

from __future__ import annotations

import pytest

from flowmill.arguments import merge_trailing_overrides
from flowmill.cli import build_parser


def parse(*argv: str):
    return merge_trailing_overrides(build_parser(), list(argv))


def test_train_takes_a_config_or_a_run_to_resume():
    args = parse("train", "c.yaml", "trainer.max_steps=3")
    assert (args.config, args.overrides, args.resume) == ("c.yaml", ["trainer.max_steps=3"], None)
    args = parse("train", "--resume", "runs/a", "trainer.max_steps=6", "optim.lr=1")
    # argparse hands the first override to the optional CONFIG; flowmill.train.commands:train gives it back.
    assert (args.config, args.overrides, args.resume) == ("trainer.max_steps=6", ["optim.lr=1"], "runs/a")


def test_sample_defaults_and_repeated_prompts():
    args = parse("sample", "runs/a", "--prompt", "one", "--prompt", "two", "--out", "o")
    assert (args.source, args.prompt, args.out, args.text_from) == ("runs/a", ["one", "two"], "o", None)
    assert (args.num_samples, args.steps, args.cfg, args.sampler, args.seed) == (4, 25, None, "euler", 0)  # --cfg: the run's sample.cfg_scale
    assert (args.guidance, args.raag_alpha) == ("cfg", 12.0)  # constant CFG unless asked
    args = parse("sample", "runs/a", "--prompt", "one", "--guidance", "raag", "--raag-alpha", "4", "--cfg", "7", "--out", "o")
    assert (args.guidance, args.raag_alpha, args.cfg) == ("raag", 4.0, 7.0)


def test_reconstruct_takes_inputs_and_task_options_and_needs_out(capsys):
    args = parse("reconstruct", "runs/t", "a.npy", "b.mp4", "--num-tokens", "2", "--out", "r")
    assert (args.source, args.inputs, args.num_tokens, args.out) == ("runs/t", ["a.npy", "b.mp4"], 2, "r")
    assert (args.cfg, args.fit, args.data, args.num_samples) == (1.0, None, None, None)  # no guidance; the run's own settings
    # An autoencoder run reconstructs held-out images without INPUT; the task refuses what it cannot use.
    args = parse("reconstruct", "runs/vae", "--num-samples", "16", "--data", "datasets/val", "--out", "r")
    assert (args.inputs, args.num_tokens, args.num_samples, args.data) == ([], None, 16, "datasets/val")
    with pytest.raises(SystemExit):
        parse("reconstruct", "runs/t", "a.npy")
    assert "--out" in capsys.readouterr().err


def test_import_and_export_name_their_format():
    args = parse("import", "sd3", "diffusers/transformer", "--out", "models/m")
    assert (args.format, args.source, args.out) == ("sd3", "diffusers/transformer", "models/m")
    args = parse("export", "sd3", "runs/a", "out/sd3", "--live")
    assert (args.format, args.source, args.out, args.live) == ("sd3", "runs/a", "out/sd3", True)
    assert parse("export", "sd3", "runs/a", "out/sd3").live is False


def test_judge_takes_a_config_and_overrides():
    args = parse("judge", "configs/flm_tiny.yaml", "judge.steps=5")
    assert (args.config, args.overrides) == ("configs/flm_tiny.yaml", ["judge.steps=5"])
