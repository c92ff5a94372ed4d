"""flowmill.train.signals: a stop signal becomes ``Stopped`` in the main thread, and a worker of
`flowmill launch local` stops once its launcher is gone (a 2-process launch killed with SIGKILL runs
in tests/train/test_failures.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from flowmill.train import signals
from flowmill.train.signals import PARENT_PID_ENV, Stopped, stopping_on_signals


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_raises_stopped_once_and_the_handlers_come_back(monkeypatch, signum):
    monkeypatch.setattr(signals, "EXIT_AFTER_S", 1e6)  # the hard exit a stuck process gets must not end pytest
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(Stopped) as stopped, stopping_on_signals():
        os.kill(os.getpid(), signum)
        time.sleep(5)
    assert stopped.value.signum == signum and stopped.value.reason == f"received {signal.Signals(signum).name}"
    assert isinstance(stopped.value, KeyboardInterrupt)  # the loop records such an end as killed
    assert {sig: signal.getsignal(sig) for sig in before} == before


# A launcher (the middle process) starts a worker and dies by SIGKILL; the worker must notice.
WORKER = """
import os, sys, time
from flowmill.train.signals import Stopped, stopping_on_signals
try:
    with stopping_on_signals():
        print("ready", flush=True)
        time.sleep(60)
except Stopped as stop:
    open(sys.argv[1], "w").write(stop.reason)
"""
LAUNCHER = """
import os, subprocess, sys
env = {**os.environ, "FLOWMILL_PARENT_PID": str(os.getpid())}
worker = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], env=env, stdout=subprocess.PIPE, text=True)
print(worker.pid, worker.stdout.readline().strip(), flush=True)
worker.wait()
"""


def test_a_worker_stops_soon_after_its_launcher_is_killed(tmp_path):
    said = tmp_path / "said"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, WORKER, str(said)], stdout=subprocess.PIPE, text=True)
    worker_pid, state = launcher.stdout.readline().split()
    assert state == "ready"
    launcher.kill()
    launcher.wait()
    deadline = time.time() + 10
    while not said.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert said.read_text() == "its launcher is gone"
    while time.time() < deadline:
        try:
            os.kill(int(worker_pid), 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    pytest.fail("the worker outlived its launcher")


def test_a_worker_whose_launcher_is_already_gone_does_not_start(monkeypatch):
    monkeypatch.setenv(PARENT_PID_ENV, str(os.getppid() + 1_000_000))
    with pytest.raises(Stopped, match="its launcher is gone"), stopping_on_signals():
        pytest.fail("started")
