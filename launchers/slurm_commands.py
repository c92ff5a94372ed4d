"""SLURM's own commands (sinfo, squeue, scontrol), as the login node and the job both call them."""

from __future__ import annotations

import subprocess

from flowmill.errors import UsageError

TIMEOUT_S = 60  # a controller that does not answer in this time is treated as down


def run_slurm(*command: str) -> str:
    """Run a SLURM command; returns its stdout, raises UsageError with its message."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise UsageError(f"{command[0]} got no answer in {TIMEOUT_S} s; is the SLURM controller up?") from None
    if done.returncode != 0:
        raise UsageError(f"{' '.join(command)} failed: {(done.stderr or done.stdout).strip()}")
    return done.stdout


def partitions() -> tuple[dict[str, int], str | None]:
    """The cluster's partitions with their node counts, and the default partition (or None)."""
    nodes: dict[str, int] = {}
    default = None
    for line in run_slurm("sinfo", "--noheader", "--format=%P %D").splitlines():
        name, count = line.split()
        if name.endswith("*"):
            name = default = name[:-1]
        nodes[name] = nodes.get(name, 0) + int(count)
    return nodes, default


def requeue(job_id: str) -> None:
    """Put the job back in the queue (it keeps its id, pickle and log files)."""
    run_slurm("scontrol", "requeue", job_id)


def live_state(job_id: str) -> str | None:
    """The queue state of a pending or running job (``PENDING``, ``RUNNING``...), None once it has ended."""
    try:
        return run_slurm("squeue", "--noheader", "--format=%T", f"--jobs={job_id}").strip() or None
    except UsageError as error:
        if "Invalid job id" in str(error):  # squeue's answer for a job that left the queue
            return None
        raise
