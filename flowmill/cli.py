"""The ``flowmill`` command line: one entry point, one sub-command per verb.

Every command group registers its parsers from a module that imports nothing heavy, and
names its handler as ``"module:function"`` (see ``flowmill.arguments``). A UsageError from
any handler is printed here, on one line, with exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from flowmill import __version__, config_cli
from flowmill.arguments import LOG_LEVEL_ENV, LOG_LEVELS, add_log_level, leaf_parsers, merge_trailing_overrides, run_handler
from flowmill.data import cli as data_cli
from flowmill.errors import UsageError
from flowmill.launchers import cli as launchers_cli
from flowmill.runs import cli as runs_cli
from flowmill.train import cli as train_cli

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

EXAMPLES = """examples:
  flowmill train configs/mmdit_digits.yaml trainer.max_steps=100
  flowmill train mmdit_tiny trainer.max_steps=4          (a config shipped with flowmill: flowmill config list)
  flowmill config show mmdit_tiny trainer.max_steps=4
  flowmill launch local --nproc 2 configs/mmdit_digits.yaml
  flowmill resume runs/mmdit-digits-20260101-120000 trainer.max_steps=400
  flowmill sample runs/mmdit-digits-20260101-120000 --prompt "a handwritten digit seven" --out samples/
  flowmill sample runs/flm-shakespeare-20260101-120000 --steps 32 --num-samples 8 --out samples.jsonl
  flowmill reconstruct runs/video-tokenizer-moving-digits-20260101-120000 clip.npy --num-tokens 4 --out recon/
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowmill",
        description="Train flow-based generative models (rectified flow) with DeepSpeed, WebDataset and MLflow.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"flowmill {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train_cli.register(commands)
    launchers_cli.register(commands)
    data_cli.register(commands)
    runs_cli.register(commands)
    config_cli.register(commands)
    for command in [parser, *leaf_parsers(parser)]:
        add_log_level(command)
    return parser


def set_log_level(args: argparse.Namespace) -> None:
    """The verbosity of this command and of the processes it starts: --log-level, else $FLOWMILL_LOG_LEVEL."""
    level = getattr(args, "log_level", None) or os.environ.get(LOG_LEVEL_ENV, "info").lower()
    if level not in LOG_LEVELS:
        raise UsageError(f"{LOG_LEVEL_ENV}: {level!r} is not one of {', '.join(LOG_LEVELS)}")
    os.environ[LOG_LEVEL_ENV] = level
    logger = logging.getLogger("flowmill")
    logger.setLevel(level.upper())
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[flowmill] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    args = merge_trailing_overrides(build_parser(), argv)
    try:
        set_log_level(args)
        return run_handler(args)
    except UsageError as error:
        print(f"flowmill: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
