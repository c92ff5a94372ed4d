"""flowmill.runs.cli: the parsers of `runs list|compare|logs` and `ui` import nothing heavy, and name handlers that exist."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from flowmill.cli import build_parser


def test_the_command_line_parser_leaves_mlflow_unimported():
    """`flowmill --help` and the commands that read no run do not pay MLflow's seconds-long import."""
    code = "import sys; from flowmill.cli import build_parser; build_parser(); print(sorted(m for m in sys.modules if m.startswith('mlflow')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "argv",
    [["runs", "list"], ["runs", "compare", "RUN"], ["runs", "logs", "RUN"], ["ui"]],
)
def test_every_command_names_a_handler_that_exists(argv: list[str]) -> None:
    module_name, function_name = build_parser().parse_args(argv).handler.split(":")
    assert module_name.startswith("flowmill.runs.")
    assert callable(getattr(importlib.import_module(module_name), function_name))
