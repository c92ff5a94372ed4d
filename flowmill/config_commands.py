"""Handlers of ``flowmill config show`` and ``flowmill config list`` (parsers in ``flowmill.config_cli``)."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys

import yaml

from flowmill.config_files import find_config, resolve_config, shipped_dir, shipped_names


def show_command(args: argparse.Namespace) -> int:
    """Print the resolved config as YAML, after a comment naming the file it was read from."""
    path = find_config(args.config)
    resolved = resolve_config(args.config, args.overrides)
    if args.full:
        # Libraries the tasks import (DeepSpeed) log to stdout as they load: keep stdout the YAML alone.
        with contextlib.redirect_stdout(sys.stderr):
            # Deliberately lazy: typing a config imports the tasks, hence torch (start-up time of the plain show).
            config = importlib.import_module("flowmill.train.config")
            resolved = config.to_dict(config.load_config(None, [], base=resolved))
    print(f"# {args.config}: {path.resolve()}")
    print(yaml.safe_dump(resolved, sort_keys=False), end="")
    return 0


def list_command(args: argparse.Namespace) -> int:
    """Print each shipped config's name and file."""
    folder = shipped_dir()
    for name in shipped_names():
        print(f"{name:<32} {folder / name}.yaml")
    return 0
