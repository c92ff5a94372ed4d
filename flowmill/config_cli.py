"""Parsers of ``flowmill config show`` and ``flowmill config list``; handlers in ``flowmill.config_commands``."""

from __future__ import annotations

import argparse

from flowmill.arguments import add_config, set_handler

COMMANDS = "flowmill.config_commands"


def register(commands: argparse._SubParsersAction) -> None:
    config = commands.add_parser(
        "config", help="print a run config, or list the configs that ship with flowmill",
        description="Read configs without starting anything: `config show` prints one resolved, `config list` "
        "names the shipped ones (any command that takes a CONFIG accepts such a name).",
    )
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="COMMAND")
    show = config_commands.add_parser(
        "show", help="print a config as YAML: its base: chain merged, the overrides applied",
        description="Print CONFIG (a YAML file or a shipped name such as mmdit_tiny) as YAML, with the configs it "
        "starts from (base: NAME|PATH, recursively) merged under it and the KEY=VALUE overrides applied. "
        "Nothing is trained and torch is not imported. With --full every key of the task's schema is printed "
        "with its default, checked as `flowmill train` would check it. "
        "Example: flowmill config show mmdit_tiny trainer.max_steps=4",
    )
    add_config(show)
    show.add_argument("--full", action="store_true",
                      help="add every default and check the config as training would (imports torch: slower)")
    set_handler(show, f"{COMMANDS}:show_command")
    listing = config_commands.add_parser(
        "list", help="the configs that ship with flowmill",
        description="One line per shipped config: its name (what a command accepts as CONFIG) and its file.",
    )
    set_handler(listing, f"{COMMANDS}:list_command")
