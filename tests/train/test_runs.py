"""flowmill.train.runs on a real embedded MLflow store: summaries, tables, the CLI and its errors."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

from flowmill.cli import main
from flowmill.train import runs
from flowmill.train.runs import MetricSummary
from flowmill.train.tracking import default_tracking_uri, sqlite_artifact_location
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from flowmill.errors import UsageError

START_MS = 1_767_225_600_000  # 2026-01-01 00:00 UTC


def loss_history(final: float, steps: int = 5) -> list[tuple[int, float]]:
    """A decreasing loss that bottoms out one step before the end and rises to ``final``."""
    return [(step, final + 0.1 * (steps - 1 - step) if step < steps - 1 else final - 0.05) for step in range(1, steps)] + [
        (steps, final)
    ]


def log_run(client: MlflowClient, experiment_id: str, name: str, lr: str, final_loss: float, duration_s: int, **tags) -> str:
    run = client.create_run(experiment_id, start_time=START_MS, run_name=name, tags=tags)
    params = [Param("optim.lr", lr), Param("model.depth", "2"), Param("run.name", name), Param("trainer.max_steps", "5")]
    metrics = [Metric("train/loss", value, START_MS + step, step) for step, value in loss_history(final_loss)]
    metrics += [Metric("train/lr", float(lr), START_MS + step, step) for step in range(1, 6)]
    metrics += [Metric("train/samples_per_s", 100.0 + step, START_MS + step, step) for step in range(1, 6)]
    metrics += [Metric("system/cpu_utilization_percentage", 50.0, START_MS, 0)]
    client.log_batch(run.info.run_id, metrics=metrics, params=params)
    client.set_terminated(run.info.run_id, "FINISHED", end_time=START_MS + duration_s * 1000)
    return run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A runs root with one SQLite store: experiment "digits" with runs a (run dir, SLURM job) and b (resumed), "other" with c."""
    root = tmp_path_factory.mktemp("runs")
    uri = default_tracking_uri(root)
    client = MlflowClient(uri)
    digits = client.create_experiment("digits", artifact_location=sqlite_artifact_location(uri))
    other = client.create_experiment("other", artifact_location=sqlite_artifact_location(uri))
    run_dir = root / "digits-a"
    run_dir.mkdir()
    a = log_run(client, digits, "digits", "0.001", 0.5, 125, **{"flowmill.run_dir": str(run_dir)})
    b = log_run(client, digits, "digits", "0.0003", 0.75, 3700, **{"flowmill.slurm_job_id": "4242"})
    client.log_batch(b, tags=[RunTag("resume.changed_param.trainer.max_steps", "40")])
    c = log_run(client, other, "other", "0.001", 0.25, 5)
    (run_dir / "run.json").write_text(
        json.dumps({"tracking_uri": uri, "experiment_id": digits, "run_id": a, "status": "preempted", "slurm_job_id": 77})
    )
    return {"root": root, "uri": uri, "a": a, "b": b, "c": c, "run_dir": run_dir}


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_best_direction_and_metric_summary() -> None:
    assert runs.best_direction("train/loss") == "min"
    assert runs.best_direction("val/loss") == "min"
    assert runs.best_direction("train/samples_per_s") == "max"
    assert runs.best_direction("train/lr") is None
    # Final is the value at the highest step even when that step was not logged last; NaN is never best.
    history = [(1, 2.0), (3, 0.5), (2, math.nan), (4, 1.0), (3, 0.7)]
    assert runs.summarize_metric("train/loss", history) == MetricSummary(1.0, 4, "min", 0.5, 3)
    assert runs.summarize_metric("train/samples_per_s", history) == MetricSummary(1.0, 4, "max", 2.0, 1)
    assert runs.summarize_metric("train/lr", history) == MetricSummary(1.0, 4, None, None, None)
    with pytest.raises(ValueError, match="no points"):
        runs.summarize_metric("train/loss", [])


def test_formatting() -> None:
    assert [runs.format_duration(s) for s in (0, 42, 125, 3700, 90061)] == ["0s", "42s", "2m 05s", "1h 01m", "1d 01h"]
    assert runs.format_number(0.123456) == "0.1235"
    assert runs.format_number(12345.0) == "1.234e+04"
    assert runs.format_number(None) == "—"


def test_load_runs_by_run_dir_and_by_id(store: dict) -> None:
    a, b = runs.load_runs([str(store["run_dir"]), store["b"], store["b"]], store["uri"])
    assert [a.run_id, b.run_id] == [store["a"], store["b"]]
    # The run dir's run.json wins over MLflow for status and SLURM job id; without one, MLflow and tags speak.
    assert (a.name, a.status, a.slurm_job_id, a.run_dir) == ("digits-a", "preempted", "77", store["run_dir"].resolve())
    assert (b.name, b.status, b.slurm_job_id, b.run_dir) == ("digits", "finished", "4242", None)
    assert a.experiment == b.experiment == "digits"
    assert (a.duration_s(), b.duration_s()) == (125.0, 3700.0)
    assert b.params["trainer.max_steps"] == "5 → 40"
    assert set(a.metrics) == {"train/loss", "train/lr", "train/samples_per_s"}  # system/* is left out
    assert a.metrics["train/loss"] == MetricSummary(0.5, 5, "min", 0.45, 4)
    assert b.metrics["train/loss"] == MetricSummary(0.75, 5, "min", 0.7, 4)
    assert a.metrics["train/samples_per_s"].best == 105.0
    assert runs.differing_params([a, b]) == ["optim.lr", "trainer.max_steps"]
    assert runs.differing_params([a]) == []
    only_loss = runs.load_runs([store["a"]], store["uri"], metrics=["train/loss", "system/cpu_utilization_percentage"])
    assert set(only_loss[0].metrics) == {"train/loss", "system/cpu_utilization_percentage"}


def test_running_run_duration_counts_to_now(store: dict) -> None:
    client = MlflowClient(store["uri"])
    run = client.create_run(client.get_experiment_by_name("other").experiment_id, start_time=START_MS)
    try:
        [summary] = runs.load_runs([run.info.run_id], store["uri"])
        assert (summary.status, summary.end_ms) == ("running", None)
        assert summary.duration_s(now_ms=START_MS + 61_000) == 61.0
    finally:
        client.delete_run(run.info.run_id)


def test_compare_command_prints_differing_params_metrics_status_duration_job(
    store: dict, capsys: pytest.CaptureFixture
) -> None:
    code, out, err = run_cli(capsys, "runs", "compare", str(store["run_dir"]), store["b"], "--tracking-uri", store["uri"])
    assert (code, err) == (0, "")
    cells = [[cell.strip() for cell in line.split("│")[1:-1]] for line in out.splitlines() if line.count("│") == 4]
    rows = {row[0]: row[1:] for row in cells}
    assert rows["run id"] == [store["a"], store["b"]]
    assert rows["status"] == ["preempted", "finished"]
    assert rows["duration"] == ["2m 05s", "1h 01m"]
    assert rows["slurm job"] == ["77", "4242"]
    assert rows["optim.lr"] == ["0.001", "0.0003"]
    assert rows["trainer.max_steps"] == ["5", "5 → 40"]
    assert rows["train/loss final"] == ["0.5 @5", "0.75 @5"]
    assert rows["train/loss best (min)"] == ["0.45 @4", "0.7 @4"]
    assert rows["train/samples_per_s best (max)"] == ["105 @5", "105 @5"]
    assert "model.depth" not in rows and "run.name" not in rows and "train/lr best" not in out
    assert "1 params equal in all runs are not shown" in out


def test_list_command_one_row_per_run_of_the_experiment(store: dict, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run_cli(capsys, "runs", "list", "digits", "--tracking-uri", store["uri"])
    assert (code, err) == (0, "")
    lines = [line for line in out.splitlines() if line.startswith("│")]
    assert len(lines) == 2 and "2 runs" in out
    assert "optim.lr" in out and "model.depth" not in out
    by_name = {line.split("│")[1].strip(): line for line in lines}
    assert set(by_name) == {"digits-a", "digits"}
    for cell in ("preempted", "2m 05s", "77", "0.001", "0.5 @5", "0.45 @4"):
        assert cell in by_name["digits-a"]
    for cell in ("finished", "1h 01m", "4242", "0.0003", "0.75 @5", "0.7 @4"):
        assert cell in by_name["digits"]
    code, out, _ = run_cli(capsys, "runs", "list", "--tracking-uri", store["uri"])
    assert code == 0 and "3 runs" in out and "other" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["runs", "list", "nope"], "no experiment 'nope' in sqlite:///{root}/mlflow.db; choose one of: Default, digits, other"),
        (["runs", "list", "--metric", "val/loss"],
         "no metric val/loss in these runs; choose from: system/cpu_utilization_percentage, train/loss, train/lr, "
         "train/samples_per_s"),
        (["runs", "list", "--max-runs", "0"], "--max-runs must be at least 1, got 0"),
        (["runs", "compare", "{root}"], "is a folder but not a flowmill run dir (no run.json)"),
        (["runs", "compare", "not-a-run"], "not-a-run is neither a run dir nor an MLflow run id (32 hex digits)"),
        (["runs", "compare", "0" * 32], f"{'0' * 32}: no run {'0' * 32} in the MLflow store"),
    ],
)  # fmt: skip
def test_cli_errors_name_what_to_pass(store: dict, capsys: pytest.CaptureFixture, argv: list[str], message: str) -> None:
    argv = [arg.format(root=store["root"]) for arg in argv] + ["--tracking-uri", store["uri"]]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("flowmill: error: ") and message.format(root=store["root"]) in err


def test_missing_store_is_refused_not_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, "runs", "list")
    assert code == 2 and f"no MLflow store at {tmp_path / 'runs' / 'mlflow.db'}" in err
    assert not (tmp_path / "runs").exists()
    with pytest.raises(UsageError, match="no MLflow store"):
        runs.MlflowServer(tmp_path, port=5999).__enter__()


def test_ui_refuses_a_bad_port_before_starting_anything(store: dict, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run_cli(capsys, "ui", "--runs-root", str(store["root"]), "--port", "70000")
    assert (code, out) == (2, "")
    assert "--port must be between 1 and 65535, got 70000" in err
    assert not (store["root"] / runs.SERVER_LOG).exists()


def test_compare_url_names_runs_and_experiments(store: dict) -> None:
    summaries = runs.load_runs([store["c"], store["a"]], store["uri"], metrics=[])
    url = runs.compare_url("http://127.0.0.1:5000", summaries)
    prefix = "http://127.0.0.1:5000/#/compare-runs?runs="
    assert url.startswith(prefix)
    run_part, experiment_part = url.removeprefix(prefix).split("&experiments=")
    assert json.loads(unquote(run_part)) == [store["c"], store["a"]]
    assert json.loads(unquote(experiment_part)) == sorted({s.experiment_id for s in summaries})


def test_ui_runs_newest_by_default_named_runs_from_this_store_only(store: dict, tmp_path: Path) -> None:
    newest = runs.ui_runs(store["root"], [])
    assert {run.run_id for run in newest} == {store["a"], store["b"], store["c"]}
    assert all(run.metrics == {} for run in newest)
    assert [run.run_id for run in runs.ui_runs(store["root"], [store["b"], str(store["run_dir"])])] == [store["b"], store["a"]]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "run.json").write_text(json.dumps({"tracking_uri": "sqlite:////x/mlflow.db", "run_id": store["a"]}))
    with pytest.raises(UsageError, match="is tracked in sqlite:////x/mlflow.db, not in sqlite:///"):
        runs.ui_runs(store["root"], [str(elsewhere)])


def test_server_refuses_a_busy_port(store: dict) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UsageError, match=f"port {port} on 127.0.0.1 is in use; choose another with --port"):
            runs.MlflowServer(store["root"], port).__enter__()


def test_the_command_line_parser_leaves_mlflow_unimported():
    """`flowmill --help` and the commands that read no run do not pay MLflow's seconds-long import."""
    code = "import sys; from flowmill.cli import build_parser; build_parser(); print(sorted(m for m in sys.modules if m.startswith('mlflow')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
