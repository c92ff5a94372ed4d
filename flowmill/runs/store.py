"""Runs read back from MLflow: each run summarised as a ``RunSummary``.

A run is named by its run dir (the folder holding ``run.json``, which says where it is tracked)
or by its MLflow run id (looked up in one store, by default the SQLite store under ``./runs``).
A summary holds status, duration, SLURM job id, params and, per metric, the final value (at the
highest step) and, where one direction is better, the best value over the whole history: the
minimum for loss-like metrics, the maximum for throughputs.

MLflow params are immutable, so tracking writes a param changed on resume as the tag
``resume.changed_param.<key>``; the summary shows it as ``old → new``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from flowmill.errors import UsageError
from flowmill.run_dir import RUN_JSON, RunDir
from flowmill.runs.defaults import MAX_LISTED_RUNS
from flowmill.train import tracking
from flowmill.train.tracking_store import default_tracking_uri

Direction = Literal["min", "max"]

RUN_ID = re.compile(r"[0-9a-f]{32}")
SLURM_JOB_TAG = "flowmill.slurm_job_id"
RUN_DIR_TAG = "flowmill.run_dir"
CHANGED_PARAM_TAG = "resume.changed_param."
LIST_METRICS = ("train/loss", "val/loss")
# Metrics MLflow's own monitor writes (CPU, memory, GPU): left out unless asked for by name.
SYSTEM_PREFIX = "system/"


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


def default_uri() -> str:
    """The embedded store of the current folder's ``runs/``, where run ids are looked up unless --tracking-uri says."""
    return default_tracking_uri(Path("runs"))


def open_store(tracking_uri: str) -> MlflowClient:
    """A client on ``tracking_uri``; a ``sqlite:///`` store must already exist (MLflow would create an empty one)."""
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
    return MlflowClient(tracking_uri=tracking_uri)


def resolve_run(name: str, tracking_uri: str) -> tuple[str, str, Path | None]:
    """``(tracking_uri, run_id, run_dir)`` of a run named by its run dir or by its MLflow run id in ``tracking_uri``.

    A run dir's own run.json names its store. Anything else must be a 32-hex-digit run id.
    """
    run_dir = RunDir(name)
    if run_dir.path.is_dir():
        if not run_dir.info_file.is_file():
            raise UsageError(f"{name} is a folder but not a flowmill run dir (no {RUN_JSON}); pass a run dir or an MLflow run id")
        info = run_dir.info()
        if not info.get("run_id") or not info.get("tracking_uri"):
            raise UsageError(f"{name} has no MLflow run in its {RUN_JSON} (tracking was unreachable when it started)")
        return info["tracking_uri"], info["run_id"], run_dir.path.resolve()
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
        except MlflowException as exc:
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
    if run_dir is None or not RunDir(run_dir).info_file.is_file():
        return {}
    info = RunDir(run_dir).info()
    return info if info.get("run_id") == run_id else {}
