"""flowmill.cli: one parser for every command, built without heavy imports; a UsageError from any
handler is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowmill import cli
from flowmill.arguments import add_overrides, set_handler

# What building the parser and printing any command's help must not import (each takes long to load).
HEAVY = ("torch", "numpy", "mlflow", "deepspeed", "webdataset", "submitit", "requests", "rich", "sklearn")

COMMANDS = {
    "train": "flowmill.train.commands:train",
    "sample": "flowmill.train.commands:sample",
    "reconstruct": "flowmill.train.commands:reconstruct",
    "import sd3": "flowmill.train.commands:import_sd3",
    "export sd3": "flowmill.train.commands:export_sd3",
    "judge": "flowmill.train.commands:judge",
    "launch local": "flowmill.launchers.local:launch_command",
    "launch slurm": "flowmill.launchers.slurm_submit:launch_command",
    "resume": "flowmill.launchers.local:resume_command",
    "data pack": "flowmill.data.commands:pack_command",
    "data tokenizer": "flowmill.data.commands:tokenizer_command",
    "data inspect": "flowmill.data.commands:inspect_command",
    "data encode": "flowmill.data.commands:encode_command",
    "runs list": "flowmill.runs.commands:list_command",
    "runs compare": "flowmill.runs.commands:compare_command",
    "runs logs": "flowmill.runs.logs:logs_command",
    "runs sync": "flowmill.runs.commands:sync_command",
    "ui": "flowmill.runs.commands:ui_command",
    "config show": "flowmill.config_commands:show_command",
    "config list": "flowmill.config_commands:list_command",
}

FAKE_HANDLERS = '''
from flowmill.errors import UsageError


def refuse(args):
    raise UsageError(f"model.depth: {args.value} is not a depth; give a positive integer")


def crash(args):
    raise ValueError("a bug, not a user error")


def succeed(args):
    print("ran with", args.overrides)
    return int(args.value)
'''


def leaf_parsers(parser: argparse.ArgumentParser,
                 path: tuple[str, ...] = ()) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """(``"launch local"``, its parser) for every command that runs something."""
    groups = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    if not groups:
        yield " ".join(path), parser
        return
    for name, sub in groups[0].choices.items():
        yield from leaf_parsers(sub, (*path, name))


def test_every_command_names_a_handler_function_that_imports():
    handlers = {name: parser.get_default("handler") for name, parser in leaf_parsers(cli.build_parser())}
    assert handlers == COMMANDS
    for name, target in handlers.items():
        module_name, function_name = target.split(":")
        assert callable(getattr(importlib.import_module(module_name), function_name, None)), name


def test_the_parser_and_every_commands_help_import_nothing_heavy():
    """`flowmill --help` and `flowmill COMMAND --help` (MLflow's `runs` and `ui` too) do not pay the
    seconds-long import of torch or MLflow: checked in a fresh interpreter."""
    code = f"""
import contextlib, io, json, sys
import flowmill.cli
for argv in [[], *(name.split() for name in {list(COMMANDS)!r})]:
    with contextlib.redirect_stdout(io.StringIO()) as help_text, contextlib.suppress(SystemExit):
        flowmill.cli.main([*argv, "--help"])
    assert "usage: flowmill" in help_text.getvalue(), argv
print(json.dumps(sorted({{name.split(".")[0] for name in sys.modules}} & set({HEAVY!r}))))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout) == []


@pytest.fixture
def fake_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``flowmill`` with three commands whose handlers live in a module imported only when one runs."""
    (tmp_path / "flowmill_fake_handlers.py").write_text(FAKE_HANDLERS)
    monkeypatch.syspath_prepend(str(tmp_path))

    def build_parser() -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog="flowmill")
        commands = parser.add_subparsers(dest="command", required=True)
        for name in ("refuse", "crash", "succeed"):
            command = commands.add_parser(name)
            command.add_argument("value")
            add_overrides(command)
            set_handler(command, f"flowmill_fake_handlers:{name}")
        return parser

    monkeypatch.setattr(cli, "build_parser", build_parser)
    yield
    sys.modules.pop("flowmill_fake_handlers", None)


def test_a_usage_error_is_one_line_on_stderr_and_exit_code_2(fake_cli, capsys):
    assert cli.main(["refuse", "-3"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "flowmill: error: model.depth: -3 is not a depth; give a positive integer\n"


def test_a_handlers_exit_code_is_the_commands(fake_cli, capsys):
    assert cli.main(["succeed", "3", "a.b=1"]) == 3
    assert capsys.readouterr() == ("ran with ['a.b=1']\n", "")


def test_other_errors_are_not_turned_into_usage_errors(fake_cli, capsys):
    with pytest.raises(ValueError, match="a bug, not a user error"):
        cli.main(["crash", "1"])
    assert capsys.readouterr().err == ""

