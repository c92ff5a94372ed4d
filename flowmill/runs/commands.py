"""Handlers of ``flowmill runs list``, ``flowmill runs compare`` and ``flowmill ui`` (parsers in
``flowmill.runs.cli``). A failing MLflow store becomes a UsageError naming what failed."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import requests
from mlflow.exceptions import MlflowException

from flowmill.errors import UsageError
from flowmill.runs.server import serve_ui
from flowmill.runs.store import default_uri, list_runs, load_runs
from flowmill.runs.tables import compare_table, list_table, print_table

Handler = Callable[[argparse.Namespace], int]


def _store_errors(handler: Handler) -> Handler:
    """``handler`` with MLflow's and HTTP errors turned into a UsageError naming what failed."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (MlflowException, requests.RequestException) as error:
            raise UsageError(f"MLflow store query failed: {' '.join(str(error).split())[:500]}") from None

    return run


@_store_errors
def list_command(args: argparse.Namespace) -> int:
    """``flowmill runs list``: a table of the newest runs of an experiment (or of all)."""
    if args.max_runs < 1:
        raise UsageError(f"--max-runs must be at least 1, got {args.max_runs}")
    uri = args.tracking_uri or default_uri()
    runs = list_runs(uri, args.experiment, args.metric, args.max_runs)
    if not runs:
        print(f"no runs in {args.experiment or 'any experiment'} of {uri}")
        return 0
    print_table(list_table(runs))
    return 0


@_store_errors
def compare_command(args: argparse.Namespace) -> int:
    """``flowmill runs compare``: the named runs side by side."""
    print_table(compare_table(load_runs(args.runs, args.tracking_uri or default_uri(), args.metric)))
    return 0


@_store_errors
def ui_command(args: argparse.Namespace) -> int:
    """``flowmill ui``: serve the MLflow UI on a runs root's store until stopped."""
    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port must be between 1 and 65535, got {args.port}")
    return serve_ui(Path(args.runs_root), args.port, args.runs)
