"""Pieces of the command line that several commands share, and how a command names its handler.

A parser is built without importing the code that runs its command: each command names its
handler as ``"module:function"`` (``set_handler``), imported only when that command runs
(``run_handler``). So ``flowmill --help`` never imports torch, DeepSpeed or MLflow.
"""

from __future__ import annotations

import argparse
import importlib

EXAMPLE_RUN = "runs/mmdit-digits-20260101-120000"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_LEVEL_ENV = "FLOWMILL_LOG_LEVEL"  # read by every flowmill process, so workers a command starts inherit it


def set_handler(parser: argparse.ArgumentParser, target: str) -> None:
    """Make ``target`` (``"module:function"``, a function ``(args) -> exit code``) run this command."""
    parser.set_defaults(handler=target)


def run_handler(args: argparse.Namespace) -> int:
    """Import the parsed command's handler and run it; returns its exit code."""
    module_name, function_name = args.handler.split(":")
    # Deliberately lazy: the command's own dependencies load only when it runs (start-up time).
    handler = getattr(importlib.import_module(module_name), function_name)
    return handler(args)


def add_config(parser: argparse.ArgumentParser, optional: bool = False) -> None:
    """The CONFIG positional (a YAML file) and its KEY=VALUE overrides."""
    parser.add_argument("config", nargs="?" if optional else None, metavar="CONFIG",
                        help="a YAML file, e.g. configs/mmdit_digits.yaml, or the name of a shipped config, e.g. mmdit_tiny")
    add_overrides(parser)


def add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides in dotted form, e.g. trainer.max_steps=40 optim.lr=3e-4")


def add_run_source(parser: argparse.ArgumentParser, what: str = "RUN_DIR|CKPT") -> None:
    """The SOURCE positional of commands that read a trained run."""
    parser.add_argument("source", metavar=what, help="a run directory or one of its checkpoints/step-* folders")


def add_sampler(parser: argparse.ArgumentParser, steps: int, cfg: float | None, cfg_help: str) -> None:
    """--steps, --cfg, --sampler and --seed of commands that integrate a flow (``cfg`` None: the
    default is the run's ``sample.cfg_scale``, filled in by the command)."""
    parser.add_argument("--steps", type=int, default=steps, help=f"ODE solver steps (default {steps})")
    default = "the run's sample.cfg_scale" if cfg is None else cfg
    parser.add_argument("--cfg", type=float, default=cfg, help=f"{cfg_help} (default {default}; 1 disables)")
    parser.add_argument("--sampler", default="euler", help="ODE solver: euler or heun (default euler)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")


RAAG_ALPHA = 12.0  # the alpha of the RAAG authors' released SD3.5 example; sample.raag_alpha's default too


def add_guidance(parser: argparse.ArgumentParser) -> None:
    """--guidance and --raag-alpha of commands that sample with classifier-free guidance (besides add_sampler's --cfg)."""
    parser.add_argument("--guidance", default="cfg",
                        help="cfg: constant --cfg at every step; raag: ratio-aware adaptive guidance, whose scale "
                        "falls from --cfg (RAAG's w_max) towards 1 where ||v_cond - v_uncond|| / ||v_uncond|| is "
                        "large (default cfg)")
    parser.add_argument("--raag-alpha", type=float, default=RAAG_ALPHA,
                        help=f"RAAG's alpha, how fast its scale falls with that ratio; 0 is constant --cfg (default {RAAG_ALPHA:g})")


def merge_trailing_overrides(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``, keeping KEY=VALUE items that come after an option as overrides.

    argparse gives a trailing positional nothing once an option came between it and the first
    positional (``resume RUN_DIR --nproc 1 trainer.max_steps=6``): such overrides come back as extras.
    """
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def add_log_level(parser: argparse.ArgumentParser) -> None:
    """--log-level, on the main parser and on every command (default: $FLOWMILL_LOG_LEVEL, else info)."""
    parser.add_argument("--log-level", choices=LOG_LEVELS, default=argparse.SUPPRESS,
                        help=f"how much flowmill logs (default: ${LOG_LEVEL_ENV}, else info)")


def leaf_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """The parsers of every command under ``parser`` (those that take no further sub-command)."""
    groups = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    if not groups:
        return [parser]
    return [leaf for group in groups for child in group.choices.values() for leaf in leaf_parsers(child)]
