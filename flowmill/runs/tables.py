"""Terminal tables of run summaries (rich): ``flowmill runs list`` and ``flowmill runs compare``.

The tables show only the params whose values differ between the runs shown, and per metric its
final value and, where one direction is better, its best, each as ``VALUE @STEP``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from rich.console import Console
from rich.table import Table

from flowmill.runs.store import RunSummary, best_direction

# Params shown as the run's name, or that differ between any two runs by construction.
IDENTITY_PARAMS = ("run.dir", "run.name")
NONE = "—"


def differing_params(runs: Sequence[RunSummary]) -> list[str]:
    """Param keys whose values are not the same in every run (a missing param counts as a value), sorted."""
    keys = sorted({key for run in runs for key in run.params} - set(IDENTITY_PARAMS))
    return [key for key in keys if len({run.params.get(key) for run in runs}) > 1]


def format_number(value: float | None) -> str:
    """Four significant digits (``0.1235``, ``1.235e+04``), ``—`` for None."""
    return NONE if value is None else f"{value:.4g}"


def format_duration(seconds: float) -> str:
    """``42s``, ``3m 05s``, ``2h 03m``, ``1d 04h``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600:02d}h"


def format_time(ms: int) -> str:
    """Local time ``YYYY-MM-DD HH:MM`` of a time in ms since the epoch."""
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M")


def metric_columns(runs: Sequence[RunSummary]) -> list[tuple[str, str]]:
    """``(key, "final" | "best (min)" | "best (max)")`` for each summarised metric, in first-seen order."""
    columns: list[tuple[str, str]] = []
    for key in dict.fromkeys(key for run in runs for key in run.metrics):
        columns.append((key, "final"))
        direction = best_direction(key)
        if direction is not None:
            columns.append((key, f"best ({direction})"))
    return columns


def metric_cell(run: RunSummary, key: str, kind: str) -> str:
    """``0.1235 @20``: the final or best value of ``key`` and its step; ``—`` when the run lacks it."""
    summary = run.metrics.get(key)
    if summary is None:
        return NONE
    if kind == "final":
        return f"{format_number(summary.final)} @{summary.final_step}"
    if summary.best is None:
        return NONE
    return f"{format_number(summary.best)} @{summary.best_step}"


def list_table(runs: Sequence[RunSummary], now_ms: int | None = None) -> Table:
    """One row per run: name, id, status, start, duration, SLURM job, differing params, final/best metrics."""
    params = differing_params(runs)
    columns = metric_columns(runs)
    table = Table(title=f"{len(runs)} run{'' if len(runs) == 1 else 's'}", title_justify="left")
    for header in ("run", "run id", "experiment", "status", "started", "duration", "slurm job", *params):
        table.add_column(header, overflow="fold")
    for key, kind in columns:
        table.add_column(f"{key}\n{kind}", justify="right")
    for run in runs:
        table.add_row(
            run.name, run.run_id[:8], run.experiment, run.status, format_time(run.start_ms),
            format_duration(run.duration_s(now_ms)), run.slurm_job_id or NONE, *(run.params.get(key, NONE) for key in params),
            *(metric_cell(run, key, kind) for key, kind in columns),
        )  # fmt: skip
    return table


def compare_table(runs: Sequence[RunSummary], now_ms: int | None = None) -> Table:
    """One column per run; rows: run facts, then the params that differ, then final/best of each metric."""
    params = differing_params(runs)
    equal = len({key for run in runs for key in run.params} - set(IDENTITY_PARAMS)) - len(params)
    table = Table(caption=f"{equal} params equal in all runs are not shown", caption_justify="left")
    table.add_column("", style="bold")
    for run in runs:
        table.add_column(run.name, overflow="fold")
    table.add_row("run id", *(run.run_id for run in runs))
    table.add_row("experiment", *(run.experiment for run in runs))
    table.add_row("status", *(run.status for run in runs))
    table.add_row("started", *(format_time(run.start_ms) for run in runs))
    table.add_row("duration", *(format_duration(run.duration_s(now_ms)) for run in runs))
    table.add_row("slurm job", *(run.slurm_job_id or NONE for run in runs))
    if params:
        table.add_section()
        for key in params:
            table.add_row(key, *(run.params.get(key, NONE) for run in runs))
    columns = metric_columns(runs)
    if columns:
        table.add_section()
        for key, kind in columns:
            table.add_row(f"{key} {kind}", *(metric_cell(run, key, kind) for run in runs))
    return table


def print_table(table: Table) -> None:
    """Print to stdout; piped output gets the table's natural width instead of being folded to 80 columns."""
    console = Console()
    if not console.is_terminal:
        natural = console.measure(table, options=console.options.update_width(10_000)).maximum
        console = Console(width=max(80, natural))
    console.print(table)
