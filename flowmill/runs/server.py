"""``flowmill ui``: a lean ``mlflow server`` on a runs root's store, and the URL of the MLflow UI's
page comparing runs.

The server runs in its own process group (one worker, no job execution, no telemetry, bound to
127.0.0.1), in the foreground until Ctrl-C, SIGTERM or SIGHUP, which stop its whole group.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

import requests

from flowmill.errors import UsageError
from flowmill.runs.defaults import MAX_COMPARED_RUNS, SERVER_LOG
from flowmill.runs.store import RunSummary, list_runs, load_runs, resolve_run
from flowmill.train.tracking_store import default_tracking_uri

SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
# Generous on purpose: the server imports MLflow afresh and opens the store, which on a small machine
# busy with training runs takes many times longer than on an idle one; a server that never answers
# still ends in an error naming its log.
SERVER_STARTUP_S = 120


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
            "--workers", "1", "--backend-store-uri", default_tracking_uri(self.runs_root),
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
    uri = default_tracking_uri(runs_root)
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
