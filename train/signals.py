"""Ending a training process on a signal, or when the launcher that started it is gone.

SIGTERM and SIGINT raise ``Stopped`` in the main thread, so the run records its end (``killed``
in run.json and MLflow) on the way out and ``flowmill train`` exits with 128 + the signal's
number instead of a traceback. A process stuck where Python cannot raise (inside a collective
whose peer is gone) is ended ``EXIT_AFTER_S`` after the signal all the same. Python drops an
exception raised where it cannot propagate (a garbage collector's callback that the signal
happened to interrupt), so the stop is also remembered (``stop_requested``): the loop raises it
at the next step, and an error that follows the signal is the stop's doing, not a failure.

A worker of ``flowmill launch local`` learns its launcher's pid from ``PARENT_PID_ENV``; if the
launcher dies (even by SIGKILL, e.g. the OOM killer), a watcher thread sees the worker's parent
change and stops it as SIGTERM would. Nothing then keeps training into a run dir that a later
``flowmill resume`` would write too.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

PARENT_PID_ENV = "FLOWMILL_PARENT_PID"  # set by flowmill launch local for its workers
EXIT_AFTER_S = 20.0  # after a stop signal, the longest a process may take to record its end and leave
WATCH_INTERVAL_S = 0.5  # how often a worker checks that its launcher is alive

_orphaned = threading.Event()  # set by the watcher when this process's launcher is gone
_requested: list[Stopped] = []  # the stop a signal asked for, once one did


class Stopped(KeyboardInterrupt):
    """The process was told to stop by ``signum`` (a KeyboardInterrupt, so the run ends ``killed``)."""

    def __init__(self, signum: int, reason: str):
        super().__init__(reason)
        self.signum = signum
        self.reason = reason


def _exit_later(code: int) -> None:
    timer = threading.Timer(EXIT_AFTER_S, os._exit, (code,))
    timer.daemon = True
    timer.start()


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    name = signal.Signals(signum).name
    reason = "its launcher is gone" if signum == signal.SIGTERM and _orphaned.is_set() else f"received {name}"
    # Once only: a second signal while the run records its end must not interrupt that.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    _exit_later(128 + signum)
    _requested.append(Stopped(signum, reason))
    raise _requested[0]


def stop_requested() -> Stopped | None:
    """The stop a signal asked for inside ``stopping_on_signals``, if one did (even where its raise was dropped)."""
    return _requested[0] if _requested else None


def _watch_parent(parent: int, done: threading.Event) -> None:
    while not done.wait(WATCH_INTERVAL_S):
        if os.getppid() != parent:
            _orphaned.set()
            os.kill(os.getpid(), signal.SIGTERM)
            return


@contextmanager
def stopping_on_signals() -> Iterator[None]:
    """Inside: ``Stopped`` is raised on SIGTERM and SIGINT in this (main) thread; and when this
    process was started by ``flowmill launch local``, it is stopped too once that launcher is gone.
    The signal handlers before are restored on the way out."""
    parent = os.environ.get(PARENT_PID_ENV)
    if parent is not None and int(parent) != os.getppid():  # the launcher died before this process got here
        raise Stopped(signal.SIGTERM, "its launcher is gone")
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in (signal.SIGTERM, signal.SIGINT)}
    _orphaned.clear()
    _requested.clear()
    watched = threading.Event()
    if parent is not None:
        threading.Thread(target=_watch_parent, args=(int(parent), watched), name="flowmill-parent-watch", daemon=True).start()
    try:
        yield
    finally:
        watched.set()
        _requested.clear()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
