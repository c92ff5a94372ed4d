"""flowmill.runs.commands through the command line: `runs compare`, `runs list`, `ui` and their errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowmill.errors import UsageError
from flowmill.runs.defaults import SERVER_LOG
from flowmill.runs.server import MlflowServer
from tests.flowmill.runs.store_fixture import run_cli


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
        MlflowServer(tmp_path, port=5999).__enter__()


def test_ui_refuses_a_bad_port_before_starting_anything(store: dict, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run_cli(capsys, "ui", "--runs-root", str(store["root"]), "--port", "70000")
    assert (code, out) == (2, "")
    assert "--port must be between 1 and 65535, got 70000" in err
    assert not (store["root"] / SERVER_LOG).exists()
