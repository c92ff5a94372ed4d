"""Parsers of the commands that read runs back: ``runs list``, ``runs compare``, ``runs logs``
and ``ui``; and of ``runs sync``, which sends a run's undelivered tracking calls."""

from __future__ import annotations

import argparse

from flowmill.arguments import set_handler
from flowmill.runs.defaults import MAX_COMPARED_RUNS, MAX_LISTED_RUNS, SERVER_LOG

COMMANDS = "flowmill.runs.commands"


def register(commands: argparse._SubParsersAction) -> None:
    runs = commands.add_parser(
        "runs",
        help="list and compare runs tracked in MLflow",
        description="Inspect runs: `runs list` tables an experiment's runs, `runs compare` puts some runs side by "
        "side, `runs logs` shows a run's SLURM output, `runs sync` sends what a run could not deliver to MLflow.",
    )
    runs_commands = runs.add_subparsers(dest="runs_command", required=True, metavar="COMMAND")
    _add_list_and_compare(runs_commands)
    _add_logs(runs_commands)
    _add_sync(runs_commands)
    _add_ui(commands)


def _add_store_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tracking-uri", metavar="URI", help="MLflow store for run ids (default: runs/mlflow.db in the current folder)"
    )
    parser.add_argument(
        "--metric", action="append", metavar="KEY", help="a metric to summarise, e.g. val/loss; repeat for several"
    )


def _add_list_and_compare(runs_subparsers: argparse._SubParsersAction) -> None:
    listing = runs_subparsers.add_parser(
        "list",
        help="table of the runs of an experiment",
        description="One row per run (newest first): status, start, duration, SLURM job id, the params that differ "
        "between the runs listed, and the final and best value of train/loss and val/loss (best = min for "
        "loss-like metrics, max for *_per_s). Each value is shown with its step as VALUE @STEP.",
    )
    listing.add_argument("experiment", nargs="?", metavar="EXPERIMENT", help="experiment name or id (default: all)")
    _add_store_options(listing)
    listing.add_argument("--max-runs", type=int, default=MAX_LISTED_RUNS, help=f"newest runs shown (default {MAX_LISTED_RUNS})")
    set_handler(listing, f"{COMMANDS}:list_command")

    compare = runs_subparsers.add_parser(
        "compare",
        help="side-by-side table of some runs",
        description="One column per run: status, start, duration, SLURM job id, the params that differ, and the "
        "final and best value of every metric but system/* (best = min for loss-like metrics, max for *_per_s). "
        "Name a run by its run dir or by its MLflow run id (looked up in --tracking-uri).",
        epilog="example: flowmill runs compare runs/mmdit-digits-20260101-120000 runs/mmdit-digits-20260102-090000",
    )
    compare.add_argument("runs", nargs="+", metavar="RUN", help="a run dir or an MLflow run id")
    _add_store_options(compare)
    set_handler(compare, f"{COMMANDS}:compare_command")


def _add_ui(commands: argparse._SubParsersAction) -> None:
    ui = commands.add_parser(
        "ui",
        help="serve the MLflow UI on the run store and print the compare page's URL",
        description="Start a lean local `mlflow server` (bound to 127.0.0.1, one worker) on RUNS_ROOT/mlflow.db "
        "with the artifacts in RUNS_ROOT/mlartifacts, and print the URL of the MLflow UI's page comparing the "
        f"named runs (default: the newest {MAX_COMPARED_RUNS} runs). Its log goes to RUNS_ROOT/{SERVER_LOG}. "
        "Runs in the foreground; Ctrl-C stops it.",
    )
    ui.add_argument("runs", nargs="*", metavar="RUN", help="runs to compare: run dirs or MLflow run ids of this store")
    ui.add_argument("--runs-root", default="runs", help="the folder holding mlflow.db (default runs)")
    ui.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default 5000)")
    set_handler(ui, f"{COMMANDS}:ui_command")


def _add_logs(runs_subparsers: argparse._SubParsersAction) -> None:
    parser = runs_subparsers.add_parser(
        "logs",
        help="print a run's SLURM stdout and stderr",
        description="Print the stdout and stderr that SLURM/submitit wrote for one process of RUN's latest job "
        "(the folder and job id come from RUN/run.json).",
    )
    parser.add_argument("run", metavar="RUN", help="a run directory launched with `flowmill launch slurm`")
    parser.add_argument("--rank", type=int, default=0, help="global rank of the process (default 0)")
    set_handler(parser, "flowmill.runs.logs:logs_command")


def _add_sync(runs_subparsers: argparse._SubParsersAction) -> None:
    parser = runs_subparsers.add_parser(
        "sync",
        help="send the tracking calls a run could not deliver to MLflow",
        description="Send the MLflow calls RUN could not deliver (its metrics, params, tags, artifacts, images, model "
        "and final status, kept in RUN/tracking/undelivered.jsonl when the tracking server stopped answering) to "
        "RUN's MLflow run in the store its run.json names. Metric steps MLflow already holds are skipped, never "
        "logged twice; the final status is set last. If the server stops answering part-way, the calls not yet "
        "sent stay, and running the command again continues.",
        epilog="example: flowmill runs sync runs/mmdit-digits-20260101-120000",
    )
    parser.add_argument("run", metavar="RUN_DIR", help="the run dir")
    set_handler(parser, f"{COMMANDS}:sync_command")
