"""Tests for flowmill.data.cli: the `flowmill data` parsers, their argument types, and that they import nothing heavy."""

import argparse
import importlib
import subprocess
import sys

import pytest

from flowmill.cli import build_parser
from flowmill.data import cli

HEAVY = ("torch", "numpy", "webdataset", "av", "sentencepiece", "PIL", "sklearn")


def test_shard_bytes_accepts_units():
    assert cli.parse_bytes("64MB") == 64_000_000 and cli.parse_bytes("1GiB") == 2**30 and cli.parse_bytes("5000") == 5000
    with pytest.raises(argparse.ArgumentTypeError, match="not a size"):
        cli.parse_bytes("lots")


def test_assignments_read_json_values():
    assert cli.parse_assignment("size=32") == ("size", 32) and cli.parse_assignment("path=a/b") == ("path", "a/b")
    assert cli.parse_assignment("flag=true") == ("flag", True) and cli.parse_assignment("sizes=[1, 2]") == ("sizes", [1, 2])
    with pytest.raises(argparse.ArgumentTypeError, match="not KEY=VALUE"):
        cli.parse_assignment("=3")


def test_the_parsers_import_nothing_heavy():
    script = ("import sys; from flowmill.data import cli; cli.register(__import__('argparse').ArgumentParser()"
              f".add_subparsers()); print(sorted(name for name in {HEAVY!r} if name in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["[]"]


@pytest.mark.parametrize("command", ["pack", "tokenizer", "inspect", "encode"])
def test_every_command_names_a_handler_that_exists(command):
    parser = build_parser()
    args = parser.parse_args({
        "pack": ["data", "pack", "builtin:digits", "OUT"],
        "tokenizer": ["data", "tokenizer", "OUT", "--text", "a.txt", "--vocab-size", "8"],
        "inspect": ["data", "inspect", "DATA", "--world-size", "1", "--num-workers", "0"],
        "encode": ["data", "encode", "DATA", "OUT", "--encoder", "m:f"],
    }[command])
    module, function = args.handler.split(":")
    assert module == "flowmill.data.commands" and callable(getattr(importlib.import_module(module), function))
