"""``flowmill runs logs``: the SLURM stdout and stderr of one process of a run's latest job.

submitit writes ``FOLDER/<job id>_<rank>_log.out|err``; the job records its id and folder in
run.json (``slurm_job_id``, ``slurm_folder``) when it starts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from submitit.core.utils import JobPaths

from flowmill.errors import UsageError
from flowmill.run_dir import RunDir


def logs_command(args: argparse.Namespace) -> int:
    """``flowmill runs logs``: print rank R's stdout then stderr of the run's latest SLURM job."""
    try:
        paths = log_paths(Path(args.run), args.rank)
    except FileNotFoundError as error:
        raise UsageError(str(error)) from None
    for path in paths:
        print(f"==> {path} <==", flush=True)
        sys.stdout.write(path.read_text(errors="replace"))
        sys.stdout.flush()
    return 0


def log_paths(run_dir: Path, rank: int) -> list[Path]:
    """The stdout and stderr files of process ``rank`` of the run's latest SLURM job."""
    info = RunDir(run_dir).info()
    job_id, folder = info.get("slurm_job_id"), info.get("slurm_folder")
    if not job_id or not folder:
        raise UsageError(
            f"{run_dir}/run.json names no SLURM job: the run was not launched with `flowmill launch slurm`, "
            "or its job has not reached its first step yet (`flowmill launch slurm` printed the log paths)"
        )
    paths = JobPaths(folder, job_id=job_id, task_id=rank)
    found = [path for path in (paths.stdout, paths.stderr) if path.is_file()]
    if not found:
        ranks = sorted({int(path.name.split("_")[-2]) for path in Path(folder).glob(f"{job_id}_*_log.*")})
        raise FileNotFoundError(
            f"no logs of rank {rank} for job {job_id} in {folder}; ranks with logs: {', '.join(map(str, ranks)) or 'none'}"
        )
    return found
