"""Handlers of ``flowmill runs list``, ``flowmill runs compare``, ``flowmill runs sync`` and
``flowmill ui`` (parsers in ``flowmill.runs.cli``). A failing MLflow store becomes a UsageError
naming what failed."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import requests
from mlflow.exceptions import MlflowException

from flowmill.errors import UsageError
from flowmill.run_dir import RunDir
from flowmill.runs.server import serve_ui
from flowmill.runs.store import default_uri, list_runs, load_runs, open_store, resolve_run
from flowmill.runs.tables import compare_table, list_table, print_table
from flowmill.train.tracking_undelivered import UndeliveredCalls, send

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


def sync_command(args: argparse.Namespace) -> int:
    """``flowmill runs sync``: send a run dir's undelivered tracking calls to its MLflow run."""
    run_dir = RunDir(args.run)
    run_dir.info()  # a folder that holds no run is an error, not "nothing to send"
    calls = UndeliveredCalls(run_dir)
    if not calls.exists():
        print(f"nothing to send: {args.run} holds no undelivered tracking calls")
        return 0
    uri, run_id, _ = resolve_run(args.run, default_uri())
    waiting = len(calls.read())
    try:
        result = send(open_store(uri), run_id, calls)
    except (MlflowException, requests.RequestException) as error:
        raise UsageError(f"MLflow at {uri} did not take run {run_id}'s calls ({' '.join(str(error).split())[:300]}); "
                         f"the {waiting} calls stay in {calls.path}; run `flowmill runs sync {args.run}` again once "
                         "it answers") from None
    status = f"; status {result.status}" if result.status else ""
    print(f"sent {result.sent} of {waiting} tracking calls to MLflow run {run_id} at {uri} ({result.already_held} metric "
          f"values MLflow already held were skipped){status}")
    for rejected in result.rejected:
        print(f"flowmill: MLflow refused {rejected}", file=sys.stderr)
    if result.remaining:
        raise UsageError(f"MLflow at {uri} stopped answering; {result.remaining} calls stay in {calls.path}; run "
                         f"`flowmill runs sync {args.run}` again once it answers")
    return 1 if result.rejected else 0


@_store_errors
def ui_command(args: argparse.Namespace) -> int:
    """``flowmill ui``: serve the MLflow UI on a runs root's store until stopped."""
    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port must be between 1 and 65535, got {args.port}")
    return serve_ui(Path(args.runs_root), args.port, args.runs)
