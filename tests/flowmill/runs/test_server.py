"""flowmill.runs.server: the compare page's URL, which runs `flowmill ui` compares, and the server's refusals
(the server itself runs in tests/e2e/test_mlflow_ui.py)."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from urllib.parse import unquote

import pytest

from flowmill.errors import UsageError
from flowmill.runs import server
from flowmill.runs.store import load_runs


def test_compare_url_names_runs_and_experiments(store: dict) -> None:
    summaries = load_runs([store["c"], store["a"]], store["uri"], metrics=[])
    url = server.compare_url("http://127.0.0.1:5000", summaries)
    prefix = "http://127.0.0.1:5000/#/compare-runs?runs="
    assert url.startswith(prefix)
    run_part, experiment_part = url.removeprefix(prefix).split("&experiments=")
    assert json.loads(unquote(run_part)) == [store["c"], store["a"]]
    assert json.loads(unquote(experiment_part)) == sorted({s.experiment_id for s in summaries})


def test_ui_runs_newest_by_default_named_runs_from_this_store_only(store: dict, tmp_path: Path) -> None:
    newest = server.ui_runs(store["root"], [])
    assert {run.run_id for run in newest} == {store["a"], store["b"], store["c"]}
    assert all(run.metrics == {} for run in newest)
    assert [run.run_id for run in server.ui_runs(store["root"], [store["b"], str(store["run_dir"])])] == [store["b"], store["a"]]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "run.json").write_text(json.dumps({"tracking_uri": "sqlite:////x/mlflow.db", "run_id": store["a"]}))
    with pytest.raises(UsageError, match="is tracked in sqlite:////x/mlflow.db, not in sqlite:///"):
        server.ui_runs(store["root"], [str(elsewhere)])


def test_server_refuses_a_busy_port(store: dict) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UsageError, match=f"port {port} on 127.0.0.1 is in use; choose another with --port"):
            server.MlflowServer(store["root"], port).__enter__()
