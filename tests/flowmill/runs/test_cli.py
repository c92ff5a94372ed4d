"""flowmill.runs.cli: the parsers of `runs list|compare|logs` and `ui` name handlers that exist
(that building them imports no MLflow is checked with every other command in tests/flowmill/test_cli.py)."""

from __future__ import annotations

import importlib

import pytest

from flowmill.cli import build_parser


@pytest.mark.parametrize(
    "argv",
    [["runs", "list"], ["runs", "compare", "RUN"], ["runs", "logs", "RUN"], ["ui"]],
)
def test_every_command_names_a_handler_that_exists(argv: list[str]) -> None:
    module_name, function_name = build_parser().parse_args(argv).handler.split(":")
    assert module_name.startswith("flowmill.runs.")
    assert callable(getattr(importlib.import_module(module_name), function_name))
