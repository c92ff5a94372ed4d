"""End to end: `flowmill ui` serves a real `mlflow server`, two runs are logged to it over HTTP, and
headless Chromium (Debian's `chromium`) renders the MLflow UI's compare page with both runs and their metric."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from flowmill.runs.server import compare_url
from flowmill.runs.store import load_runs
from flowmill.runs.tables import differing_params
from flowmill.train import tracking, tracking_store
from flowmill.train.tracking import MLflowTracker
from tests.needs import CHROMIUM, skip_reason

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# Final train/loss of the two runs: values the compare page prints exactly (it rounds to 3 decimals).
FINAL_LOSS = {"lr-1e-3": 0.125, "lr-3e-4": 0.375}
LEARNING_RATE = {"lr-1e-3": "0.001", "lr-3e-4": "0.0003"}
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
)  # fmt: skip


@pytest.fixture(scope="module")
def chromium() -> str:
    """Path of Debian's chromium; installed by tools/install_chromium.sh if missing and the tests run as root,
    skipped if missing otherwise."""
    if shutil.which("chromium") is None and os.geteuid() != 0:
        pytest.skip(skip_reason(CHROMIUM, "chromium is not installed"))
    done = subprocess.run([str(REPO / "tools" / "install_chromium.sh")], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"tools/install_chromium.sh failed:\n{done.stdout}\n{done.stderr}"
    path = shutil.which("chromium")
    assert path is not None, "tools/install_chromium.sh succeeded but chromium is not on PATH"
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def port_is_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def read_lines_until(stream, stop: str, timeout_s: float) -> list[str]:
    """Lines of ``stream`` up to the one containing ``stop``; fails after ``timeout_s`` or at end of stream."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while True:
        line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        assert line is not None, "flowmill ui exited early:\n" + "\n".join(seen)
        seen.append(line)
        if stop in line:
            return seen


def dump_dom(chromium: str, url: str) -> str:
    """The DOM of ``url`` once the React app has rendered (virtual time waits for its requests)."""
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1400,1600",
             "--virtual-time-budget=20000", "--dump-dom", url],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_compare_page_shows_both_runs_and_their_metric(
    chromium: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in tracking.HTTP_ENV_DEFAULTS.items():
        monkeypatch.setenv(name, value)  # restored after the test, unlike MLflowTracker's setdefault
    root = tmp_path / "runs"
    # A run in the embedded store first: `flowmill ui` serves an existing store only, and lists its runs.
    local = MLflowTracker.start(tracking_store.default_tracking_uri(root), "local", "local-run", system_metrics=False)
    local.log_metrics({"train/loss": 1.0}, step=1)
    local.finish()

    port = free_port()
    started = time.monotonic()
    ui = subprocess.Popen(
        [sys.executable, "-m", "flowmill.cli", "ui", "--runs-root", str(root), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # as a script's background job starts: Ctrl-C must still stop it
    )  # fmt: skip
    server_pid = None
    try:
        printed = read_lines_until(ui.stdout, "Press Ctrl-C", timeout_s=150)
        server_pid = int(re.search(r"server pid (\d+)", printed[0]).group(1))
        base = f"http://127.0.0.1:{port}"
        assert f"experiments: {base}/#/experiments" in printed
        assert any(line.startswith(f"compare 1 run: {base}/#/compare-runs?runs=") and local.run_id in line for line in printed)
        print(f"flowmill ui answered after {time.monotonic() - started:.1f} s")

        logged = {}
        for name, final in FINAL_LOSS.items():
            tracker = MLflowTracker.start(base, "ui-e2e", name, system_metrics=False)
            tracker.log_params({"optim.lr": LEARNING_RATE[name], "model.depth": "2"})
            for step in range(1, 11):
                tracker.log_metrics({"train/loss": final + (10 - step) * 0.05}, step=step)
            tracker.log_text("optim:\n  lr: " + LEARNING_RATE[name] + "\n", "config.yaml")
            tracker.finish()
            assert tracker.failures == 0
            logged[name] = tracker.run_id
        for run_id in logged.values():  # served artifacts land on disk under the runs root
            assert list((root / "mlartifacts").glob(f"*/{run_id}/artifacts/config.yaml")), run_id

        summaries = load_runs(list(logged.values()), base)
        assert [summary.metrics["train/loss"].final for summary in summaries] == list(FINAL_LOSS.values())
        assert differing_params(summaries) == ["optim.lr"]

        before_browser = time.monotonic()
        dom = dump_dom(chromium, compare_url(base, summaries))
        print(f"chromium rendered the compare page in {time.monotonic() - before_browser:.1f} s")
        assert "Comparing 2 Runs from 1 Experiment" in dom
        for name, run_id in logged.items():
            assert f">{name}<" in dom and run_id in dom
            assert f">{FINAL_LOSS[name]}<" in dom  # its cell in the metrics table
        # The parallel-coordinates chart (Plotly SVG) has an axis for the param that differs and one for the metric.
        for axis in ("optim.lr", "train/loss"):
            assert re.search(f'class="axis-title"[^>]*data-unformatted="{axis}"', dom), axis

        ui.send_signal(signal.SIGINT)
        assert ui.wait(timeout=30) == 0
        assert not port_is_open(port)
    finally:
        if ui.poll() is None:
            ui.terminate()  # flowmill ui stops its server on SIGTERM too
            try:
                ui.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(ui.pid, signal.SIGKILL)
                ui.wait()
        if server_pid is not None:  # the server has its own session: make sure it is gone
            try:
                os.killpg(server_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
