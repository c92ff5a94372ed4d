"""Compare training runs kept in MLflow: ``flowmill runs list``, ``flowmill runs compare``, ``flowmill ui``.

A run is named by its run dir (the folder holding ``run.json``, which says where it is tracked)
or by its MLflow run id (looked up in one store, by default the SQLite store under ``./runs``).
Each run is summarised as a ``RunSummary``: status, duration, SLURM job id, params and, per
metric, the final value (at the highest step) and, where one direction is better, the best value
over the whole history: the minimum for loss-like metrics, the maximum for throughputs.

The tables show only the params whose values differ between the runs shown. A param changed on
resume (MLflow params are immutable, so tracking writes the tag ``resume.changed_param.<key>``)
is shown as ``old → new``.

``flowmill ui`` runs a lean ``mlflow server`` (one worker, no job execution, no telemetry,
bound to 127.0.0.1) on a runs root's store and prints the URL of the MLflow UI's compare page.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import quote

import requests
from rich.console import Console
from rich.table import Table

from flowmill.train.run_dir import RUN_JSON
from flowmill.errors import UsageError

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

Direction = Literal["min", "max"]

RUN_ID = re.compile(r"[0-9a-f]{32}")
SLURM_JOB_TAG = "flowmill.slurm_job_id"
RUN_DIR_TAG = "flowmill.run_dir"
CHANGED_PARAM_TAG = "resume.changed_param."
# Params shown as the run's name, or that differ between any two runs by construction.
IDENTITY_PARAMS = ("run.dir", "run.name")
LIST_METRICS = ("train/loss", "val/loss")
# Metrics MLflow's own monitor writes (CPU, memory, GPU): left out unless asked for by name.
SYSTEM_PREFIX = "system/"
MAX_LISTED_RUNS = 50
MAX_COMPARED_RUNS = 10
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
SERVER_LOG = "mlflow-server.log"
SERVER_STARTUP_S = 120  # a loaded 2-core machine needs ~40 s to import MLflow twice and open the store
NONE = "—"


@dataclasses.dataclass(frozen=True)
class MetricSummary:
    final: float  # value at the highest step (the last logged one at that step)
    final_step: int  # that step
    direction: Direction | None  # which way is better; None when neither is (a learning rate)
    best: float | None  # min or max over the history per ``direction``; None without a direction
    best_step: int | None  # step of ``best`` (the first one reaching it)


@dataclasses.dataclass(frozen=True)
class RunSummary:
    run_id: str  # MLflow run id
    experiment_id: str  # MLflow experiment id
    experiment: str  # MLflow experiment name
    name: str  # run dir's folder name when known, else the MLflow run name
    run_dir: Path | None  # the flowmill run dir, from run.json or the tag flowmill.run_dir
    status: str  # run.json's status when the run dir is readable (running, finished, failed, killed, ...), else MLflow's
    start_ms: int  # MLflow start time, ms since the epoch
    end_ms: int | None  # MLflow end time; None while running
    slurm_job_id: str | None  # from run.json, else the tag flowmill.slurm_job_id
    params: dict[str, str]  # MLflow params, with values changed on resume as "old → new"
    metrics: dict[str, MetricSummary]  # summarised metrics, by key

    def duration_s(self, now_ms: int | None = None) -> float:
        """Seconds from start to end, or to ``now_ms`` (default: now) while the run has no end."""
        end = self.end_ms if self.end_ms is not None else (now_ms if now_ms is not None else int(time.time() * 1000))
        return max(0.0, (end - self.start_ms) / 1000)


def best_direction(key: str) -> Direction | None:
    """``"min"`` for loss-like metrics (``train/loss``, ``val/loss``), ``"max"`` for throughputs (``*_per_s``), else None."""
    leaf = key.rsplit("/", 1)[-1]
    if "loss" in leaf:
        return "min"
    if leaf.endswith("_per_s"):
        return "max"
    return None


def summarize_metric(key: str, history: Sequence[tuple[int, float]]) -> MetricSummary:
    """Final and best of one metric from its ``(step, value)`` points, in logging order (NaNs are never best)."""
    if not history:
        raise ValueError(f"metric {key} has no points")
    final_step = max(step for step, _ in history)
    final = [value for step, value in history if step == final_step][-1]
    direction = best_direction(key)
    best = best_step = None
    numbers = [(step, value) for step, value in history if not math.isnan(value)]
    if direction is not None and numbers:
        pick = min if direction == "min" else max
        best = pick(value for _, value in numbers)
        best_step = min(step for step, value in numbers if value == best)
    return MetricSummary(final, final_step, direction, best, best_step)


def _tracking():
    """flowmill.train.tracking, imported on first use: it imports MLflow (~3 s, after turning its
    telemetry off), which the command line's parser and every command that reads no run need not pay."""
    from flowmill.train import tracking

    return tracking


def _mlflow_error() -> type[Exception]:
    """MLflow's exception class (imported on first use, as ``_tracking``)."""
    _tracking()
    from mlflow.exceptions import MlflowException

    return MlflowException


def open_store(tracking_uri: str) -> MlflowClient:
    """A client on ``tracking_uri``; a ``sqlite:///`` store must already exist (MLflow would create an empty one)."""
    tracking = _tracking()
    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri.removeprefix("sqlite:///"))
        if not path.is_file():
            raise UsageError(
                f"no MLflow store at {path} (flowmill creates <runs root>/mlflow.db with the first run); "
                "pass --tracking-uri URI, or run the command in the folder that holds runs/"
            )
    elif tracking_uri.startswith(("http://", "https://")):
        for name, value in tracking.HTTP_ENV_DEFAULTS.items():
            os.environ.setdefault(name, value)
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def resolve_run(name: str, tracking_uri: str) -> tuple[str, str, Path | None]:
    """``(tracking_uri, run_id, run_dir)`` of a run named by its run dir or by its MLflow run id in ``tracking_uri``.

    A run dir's own run.json names its store. Anything else must be a 32-hex-digit run id.
    """
    path = Path(name)
    if path.is_dir():
        if not (path / RUN_JSON).is_file():
            raise UsageError(f"{name} is a folder but not a flowmill run dir (no {RUN_JSON}); pass a run dir or an MLflow run id")
        info = json.loads((path / RUN_JSON).read_text())
        if not info.get("run_id") or not info.get("tracking_uri"):
            raise UsageError(f"{name} has no MLflow run in its {RUN_JSON} (tracking was unreachable when it started)")
        return info["tracking_uri"], info["run_id"], path.resolve()
    if RUN_ID.fullmatch(name):
        return tracking_uri, name, None
    raise UsageError(f"{name} is neither a run dir nor an MLflow run id (32 hex digits)")


def load_runs(names: Sequence[str], tracking_uri: str, metrics: Sequence[str] | None = None) -> list[RunSummary]:
    """Summaries of the runs named by run dir or run id, in the order given (a run named twice is shown once).

    ``metrics`` picks the metric keys to summarise (default: every metric of these runs but ``system/*``).
    """
    resolved: dict[str, tuple[str, Path | None, Run]] = {}
    clients: dict[str, MlflowClient] = {}
    for name in names:
        uri, run_id, run_dir = resolve_run(name, tracking_uri)
        if run_id in resolved:
            continue
        if uri not in clients:
            clients[uri] = open_store(uri)
        try:
            run = clients[uri].get_run(run_id)
        except _mlflow_error() as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise UsageError(f"{name}: no run {run_id} in the MLflow store {uri}; pass --tracking-uri for another store") from exc
        resolved[run_id] = (uri, run_dir, run)
    keys = _metric_keys([run for _, _, run in resolved.values()], metrics, defaults=None)
    experiment_names: dict[tuple[str, str], str] = {}
    summaries = []
    for uri, run_dir, run in resolved.values():
        experiment = (uri, run.info.experiment_id)
        if experiment not in experiment_names:
            experiment_names[experiment] = clients[uri].get_experiment(run.info.experiment_id).name
        summaries.append(summarize_run(clients[uri], run, experiment_names[experiment], keys, run_dir))
    return summaries


def list_runs(
    tracking_uri: str, experiment: str | None = None, metrics: Sequence[str] | None = None, max_runs: int = MAX_LISTED_RUNS
) -> list[RunSummary]:
    """Summaries of the newest ``max_runs`` runs of ``experiment`` (a name or id; default: every experiment).

    ``metrics`` picks the metric keys (default: ``train/loss`` and ``val/loss`` where logged).
    """
    client = open_store(tracking_uri)
    experiments = experiments_of(client, tracking_uri, experiment)
    runs = client.search_runs(list(experiments), max_results=max_runs, order_by=["attributes.start_time DESC"])
    keys = _metric_keys(runs, metrics, defaults=LIST_METRICS)
    return [summarize_run(client, run, experiments[run.info.experiment_id], keys) for run in runs]


def experiments_of(client: MlflowClient, tracking_uri: str, experiment: str | None) -> dict[str, str]:
    """``{id: name}`` of ``experiment`` (a name or id), or of every experiment in the store when it is None."""
    experiments = {found.experiment_id: found.name for found in client.search_experiments()}
    if experiment is None:
        return experiments
    for experiment_id, name in experiments.items():
        if experiment in (name, experiment_id):
            return {experiment_id: name}
    names = ", ".join(sorted(experiments.values())) or "(none)"
    raise UsageError(f"no experiment {experiment!r} in {tracking_uri}; choose one of: {names}")


def _metric_keys(runs: Sequence[Run], wanted: Sequence[str] | None, defaults: Sequence[str] | None) -> list[str]:
    """Keys to summarise: ``wanted`` (each must exist), else ``defaults`` present, else all but ``system/*``."""
    present = sorted({key for run in runs for key in run.data.metrics})
    if wanted is not None:
        missing = [key for key in wanted if key not in present]
        if missing:
            raise UsageError(f"no metric {', '.join(missing)} in these runs; choose from: {', '.join(present) or '(none)'}")
        return list(dict.fromkeys(wanted))
    if defaults is not None:
        return [key for key in defaults if key in present]
    return [key for key in present if not key.startswith(SYSTEM_PREFIX)]


def summarize_run(
    client: MlflowClient, run: Run, experiment: str, metric_keys: Sequence[str], run_dir: Path | None = None
) -> RunSummary:
    """One run's summary; ``run_dir`` (else the tag ``flowmill.run_dir``) supplies run.json's status and SLURM job id."""
    tags = run.data.tags
    if run_dir is None and tags.get(RUN_DIR_TAG):
        run_dir = Path(tags[RUN_DIR_TAG])
    info = _run_json_of(run_dir, run.info.run_id)
    params = dict(run.data.params)
    for key, value in tags.items():
        if key.startswith(CHANGED_PARAM_TAG):
            param = key.removeprefix(CHANGED_PARAM_TAG)
            params[param] = f"{params[param]} → {value}" if param in params else value
    metrics = {}
    for key in metric_keys:
        if key in run.data.metrics:
            history = client.get_metric_history(run.info.run_id, key)
            metrics[key] = summarize_metric(key, [(point.step, point.value) for point in history])
    slurm_job_id = info.get("slurm_job_id") or tags.get(SLURM_JOB_TAG)
    return RunSummary(
        run_id=run.info.run_id,
        experiment_id=run.info.experiment_id,
        experiment=experiment,
        name=run_dir.name if run_dir is not None else (run.info.run_name or run.info.run_id[:8]),
        run_dir=run_dir,
        status=str(info.get("status") or run.info.status).lower(),
        start_ms=run.info.start_time,
        end_ms=run.info.end_time,
        slurm_job_id=str(slurm_job_id) if slurm_job_id else None,
        params=params,
        metrics=metrics,
    )


def _run_json_of(run_dir: Path | None, run_id: str) -> dict:
    """run.json of ``run_dir`` if it is readable here and belongs to ``run_id``, else {} (the run dir may be elsewhere)."""
    if run_dir is None or not (run_dir / RUN_JSON).is_file():
        return {}
    info = json.loads((run_dir / RUN_JSON).read_text())
    return info if info.get("run_id") == run_id else {}


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


def compare_url(base_url: str, runs: Sequence[RunSummary]) -> str:
    """The MLflow UI's compare page of ``runs``: ``<base>/#/compare-runs?runs=[ids]&experiments=[ids]`` (URL-encoded)."""
    run_ids = json.dumps([run.run_id for run in runs], separators=(",", ":"))
    experiment_ids = json.dumps(sorted({run.experiment_id for run in runs}), separators=(",", ":"))
    return f"{base_url}/#/compare-runs?runs={quote(run_ids, safe='')}&experiments={quote(experiment_ids, safe='')}"


def experiments_url(base_url: str) -> str:
    """The MLflow UI's experiments page."""
    return f"{base_url}/#/experiments"


class MlflowServer:
    """A lean ``mlflow server`` on the store of a runs root, bound to 127.0.0.1, as a context manager.

    Backend ``sqlite:///<root>/mlflow.db``, served artifacts in ``<root>/mlartifacts``, one worker,
    job execution and telemetry off. Its output goes to ``<root>/mlflow-server.log``. Entering starts it and
    returns once ``/health`` answers; leaving stops its whole process group.
    """

    def __init__(self, runs_root: Path, port: int) -> None:
        self.runs_root = Path(runs_root).resolve()
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = self.runs_root / SERVER_LOG
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> MlflowServer:
        if not (self.runs_root / "mlflow.db").is_file():
            raise UsageError(
                f"no MLflow store at {self.runs_root / 'mlflow.db'}; pass --runs-root, the folder holding a run's "
                "mlflow.db (runs/ by default)"
            )
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                raise UsageError(f"port {self.port} on 127.0.0.1 is in use; choose another with --port")
        command = [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
            "--workers", "1", "--backend-store-uri", _tracking().default_tracking_uri(self.runs_root),
            "--artifacts-destination", str(self.runs_root / "mlartifacts"),
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            # Its own session: Ctrl-C reaches only flowmill, which then stops the server's whole group.
            self.process = subprocess.Popen(
                command, env={**os.environ, **SERVER_ENV}, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + SERVER_STARTUP_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise UsageError(
                    f"mlflow server exited with code {self.process.returncode}; see {self.log_path}:\n{self.log_tail()}"
                )
            try:
                if requests.get(f"{self.url}/health", timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.25)
        raise UsageError(f"mlflow server did not answer on {self.url} within {SERVER_STARTUP_S} s; see {self.log_path}")

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines the server wrote."""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait(self) -> int:
        """Block until the server exits; its exit code."""
        return self.process.wait()

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the server's process group, SIGKILL it after ``timeout_s``; no-op once stopped."""
        if self.process is None or self.process.returncode is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            self.process.wait()


def ui_runs(runs_root: Path, names: Sequence[str]) -> list[RunSummary]:
    """Runs for the compare page: the named ones, which must be tracked in the store of ``runs_root``, or else
    its newest ``MAX_COMPARED_RUNS`` runs."""
    uri = _tracking().default_tracking_uri(runs_root)
    for name in names:
        run_uri = resolve_run(name, uri)[0]
        if run_uri != uri:
            raise UsageError(f"{name} is tracked in {run_uri}, not in {uri}; pass that store's folder as --runs-root")
    if names:
        return load_runs(names, uri, metrics=[])
    return list_runs(uri, metrics=[], max_runs=MAX_COMPARED_RUNS)


def serve_ui(runs_root: Path, port: int, names: Sequence[str] = ()) -> int:
    """``flowmill ui``: serve the store of ``runs_root`` in the foreground until Ctrl-C, SIGTERM or SIGHUP; exit code."""
    runs = ui_runs(runs_root, names)
    # The server runs in its own session, so a closed terminal or a `kill` must reach it through us.
    # SIGINT too: a process started with it ignored or blocked (a script's background job) inherits that.
    stop_signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {signum: signal.signal(signum, _interrupt) for signum in stop_signals}
    signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)
    try:
        with MlflowServer(runs_root, port) as server:
            store = server.runs_root / "mlflow.db"
            print(f"MLflow UI on {server.url} (server pid {server.process.pid}, store {store}, log {server.log_path})")
            print(f"experiments: {experiments_url(server.url)}")
            if runs:
                which = "" if names or len(runs) < MAX_COMPARED_RUNS else " (the newest; name runs to compare others)"
                print(f"compare {len(runs)} run{'' if len(runs) == 1 else 's'}{which}: {compare_url(server.url, runs)}")
            print("Press Ctrl-C to stop.", flush=True)
            code = server.wait()
    except KeyboardInterrupt:
        print("stopped the MLflow server", flush=True)
        return 0
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    raise UsageError(f"mlflow server exited with code {code}; see {server.log_path}:\n{server.log_tail()}")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _default_uri() -> str:
    return _tracking().default_tracking_uri(Path("runs"))


def _list_command(args: argparse.Namespace) -> int:
    if args.max_runs < 1:
        raise UsageError(f"--max-runs must be at least 1, got {args.max_runs}")
    runs = list_runs(args.tracking_uri or _default_uri(), args.experiment, args.metric, args.max_runs)
    if not runs:
        print(f"no runs in {args.experiment or 'any experiment'} of {args.tracking_uri or _default_uri()}")
        return 0
    print_table(list_table(runs))
    return 0


def _compare_command(args: argparse.Namespace) -> int:
    print_table(compare_table(load_runs(args.runs, args.tracking_uri or _default_uri(), args.metric)))
    return 0


def _ui_command(args: argparse.Namespace) -> int:
    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port must be between 1 and 65535, got {args.port}")
    return serve_ui(Path(args.runs_root), args.port, args.runs)


def _store_errors(handler):
    """A failing MLflow store becomes a UsageError naming what failed."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (_mlflow_error(), requests.RequestException) as error:
            raise UsageError(f"MLflow store query failed: {' '.join(str(error).split())[:500]}") from None

    return run


list_command = _store_errors(_list_command)
compare_command = _store_errors(_compare_command)
ui_command = _store_errors(_ui_command)


