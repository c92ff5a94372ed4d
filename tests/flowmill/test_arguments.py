"""flowmill.arguments: handlers named as strings and imported when their command runs, trailing
KEY=VALUE overrides, and the argument blocks commands share."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

from flowmill.arguments import (
    RAAG_ALPHA,
    add_config,
    add_guidance,
    add_overrides,
    add_run_source,
    add_sampler,
    merge_trailing_overrides,
    run_handler,
    set_handler,
)
from flowmill.cli import build_parser


def resume_like() -> argparse.ArgumentParser:
    """A positional, an option, then KEY=VALUE overrides: the shape of `flowmill resume`."""
    parser = argparse.ArgumentParser(prog="flowmill")
    parser.add_argument("run_dir")
    parser.add_argument("--nproc", type=int)
    add_overrides(parser)
    return parser


def test_a_handler_module_is_imported_only_when_its_command_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "flowmill_lazy_handler.py").write_text("def handle(args):\n    return len(args.overrides) + 40\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    parser = resume_like()
    set_handler(parser, "flowmill_lazy_handler:handle")
    args = parser.parse_args(["RUN", "a=1", "b=2"])
    assert args.handler == "flowmill_lazy_handler:handle"
    assert "flowmill_lazy_handler" not in sys.modules
    try:
        assert run_handler(args) == 42
        assert "flowmill_lazy_handler" in sys.modules
    finally:
        sys.modules.pop("flowmill_lazy_handler", None)


@pytest.mark.parametrize(
    "argv, nproc, overrides",
    [
        (["RUN", "a.b=1"], None, ["a.b=1"]),
        # argparse gives the overrides after an option nothing: they come back as extras, kept in order.
        (["RUN", "--nproc", "2", "a.b=1", "c=x=y"], 2, ["a.b=1", "c=x=y"]),
        (["RUN", "a.b=1", "--nproc", "2", "c.d=2"], 2, ["a.b=1", "c.d=2"]),
    ],
)
def test_trailing_overrides_after_an_option_are_kept(argv, nproc, overrides):
    args = merge_trailing_overrides(resume_like(), argv)
    assert (args.run_dir, args.nproc, args.overrides) == ("RUN", nproc, overrides)


@pytest.mark.parametrize(
    "argv, unrecognized",
    [
        (["RUN", "--nproc", "2", "stray"], "stray"),
        (["RUN", "--nproc", "2", "a.b=1", "stray"], "a.b=1 stray"),  # one item that is no override refuses all
        (["RUN", "--nproc", "2", "--bogus=1"], "--bogus=1"),
    ],
)
def test_other_extras_are_refused(argv, unrecognized, capsys):
    with pytest.raises(SystemExit) as exit_:
        merge_trailing_overrides(resume_like(), argv)
    assert exit_.value.code == 2
    assert f"error: unrecognized arguments: {unrecognized}" in capsys.readouterr().err


def test_a_command_without_overrides_refuses_key_value_extras(capsys):
    with pytest.raises(SystemExit):
        merge_trailing_overrides(build_parser(), ["runs", "logs", "RUN", "--rank", "1", "a.b=1"])
    assert "unrecognized arguments: a.b=1" in capsys.readouterr().err


def test_the_real_resume_command_keeps_its_trailing_overrides():
    args = merge_trailing_overrides(build_parser(), ["resume", "RUN", "--nproc", "1", "trainer.max_steps=6"])
    assert (args.run_dir, args.nproc, args.overrides) == ("RUN", 1, ["trainer.max_steps=6"])


def test_config_is_required_unless_optional(capsys):
    required = argparse.ArgumentParser()
    add_config(required)
    assert vars(required.parse_args(["c.yaml", "a=1"])) == {"config": "c.yaml", "overrides": ["a=1"]}
    with pytest.raises(SystemExit):
        required.parse_args([])
    assert "CONFIG" in capsys.readouterr().err
    optional = argparse.ArgumentParser()
    add_config(optional, optional=True)
    assert vars(optional.parse_args([])) == {"config": None, "overrides": []}


def test_sampler_and_run_source_blocks():
    parser = argparse.ArgumentParser()
    add_run_source(parser, "RUN_DIR")
    add_sampler(parser, steps=25, cfg=3.0, cfg_help="guidance")
    assert vars(parser.parse_args(["run"])) == {"source": "run", "steps": 25, "cfg": 3.0, "sampler": "euler", "seed": 0}
    args = parser.parse_args(["run", "--steps", "2", "--cfg", "1", "--sampler", "heun", "--seed", "7"])
    assert (args.steps, args.cfg, args.sampler, args.seed) == (2, 1.0, "heun", 7)
    assert "RUN_DIR" in parser.format_usage() and "(default 3.0; 1 disables)" in parser.format_help()


def test_guidance_block():
    parser = argparse.ArgumentParser()
    add_guidance(parser)
    assert vars(parser.parse_args([])) == {"guidance": "cfg", "raag_alpha": RAAG_ALPHA}
    assert vars(parser.parse_args(["--guidance", "raag", "--raag-alpha", "0.5"])) == {"guidance": "raag", "raag_alpha": 0.5}
    assert "w_max" in parser.format_help()
