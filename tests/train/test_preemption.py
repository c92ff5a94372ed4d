"""flowmill.train.preemption: a stop request recorded from a signal and read at a step boundary
(the ranks' agreement over a process group runs in tests/launchers/test_slurm_job.py)."""

from __future__ import annotations

import os
import signal

from flowmill.train.preemption import StopRequest


def test_nothing_requested_nothing_agreed():
    stop = StopRequest()
    assert not stop.agreed() and stop.reason is None


def test_the_first_reason_is_kept():
    stop = StopRequest()
    stop.request("SIGUSR2")
    stop.request("SIGTERM")
    assert stop.agreed() and stop.reason == "SIGUSR2"


def test_a_signal_records_a_request_instead_of_killing_the_process():
    previous = signal.getsignal(signal.SIGUSR2)
    try:
        stop = StopRequest()
        stop.install()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.agreed() and stop.reason == "SIGUSR2"
    finally:
        signal.signal(signal.SIGUSR2, previous)
