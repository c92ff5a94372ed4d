"""flowmill.launchers.cli: the parsers of `launch local`, `launch slurm` and `resume` give their
handlers what they read (handlers and heavy imports: tests/flowmill/test_cli.py)."""

from __future__ import annotations

from flowmill.arguments import merge_trailing_overrides
from flowmill.cli import build_parser


def parse(*argv: str):
    return merge_trailing_overrides(build_parser(), list(argv))


def test_launch_local_one_process_by_default():
    args = parse("launch", "local", "c.yaml", "a=1")
    assert (args.where, args.nproc, args.config, args.overrides) == ("local", 1, "c.yaml", ["a=1"])
    assert parse("launch", "local", "--nproc", "2", "c.yaml", "a=1").nproc == 2


def test_resume_leaves_the_process_count_to_the_run():
    args = parse("resume", "runs/a", "trainer.max_steps=40")
    assert (args.run_dir, args.nproc, args.overrides) == ("runs/a", None, ["trainer.max_steps=40"])


def test_launch_slurm_flags_are_unset_unless_given_and_repeat():
    args = parse("launch", "slurm", "c.yaml", "--sweep", "optim.lr=1,2", "--sweep", "model.depth=2,4",
                 "--slurm-extra", "reservation=r1", "--nodes", "2", "trainer.max_steps=5")
    assert (args.config, args.overrides, args.nodes) == ("c.yaml", ["trainer.max_steps=5"], 2)
    assert args.sweep == ["optim.lr=1,2", "model.depth=2,4"] and args.slurm_extra == ["reservation=r1"]
    # Unset flags stay None so that launcher.slurm.* in the config applies.
    assert all(getattr(args, name) is None for name in ("partition", "tasks_per_node", "time", "max_retries", "folder"))
    args = parse("launch", "slurm", "--resume", "runs/a", "trainer.max_steps=9")
    assert (args.resume, args.config, args.overrides) == ("runs/a", "trainer.max_steps=9", [])
