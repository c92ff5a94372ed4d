"""Tests for flowmill.data.parallel: ordered parallel pack jobs and rejected inputs."""

import os

import pytest

from flowmill.data.parallel import BadInput, parallel_map, parallel_samples


def make(job: int) -> list[dict]:
    if job % 5 == 3:
        raise BadInput(f"job {job} is unusable")
    return [{"__key__": f"j{job}-{part}", "pid": os.getpid()} for part in range(job % 3)]


@pytest.mark.parametrize("processes", [1, 2])
def test_samples_come_in_job_order_and_bad_inputs_are_reported(processes):
    rejected, lines = [], []
    samples = list(parallel_samples(make, list(range(20)), processes=processes, rejected=rejected, on_reject=lines.append))
    assert [sample["__key__"] for sample in samples] == [
        f"j{job}-{part}" for job in range(20) if job % 5 != 3 for part in range(job % 3)
    ]
    assert rejected == [{"input": str(job), "reason": f"job {job} is unusable"} for job in (3, 8, 13, 18)]
    assert lines == [f"skipping {job}: job {job} is unusable" for job in (3, 8, 13, 18)]
    pids = {sample["pid"] for sample in samples}
    assert (pids == {os.getpid()}) if processes == 1 else (os.getpid() not in pids)


def fail(job: int) -> list[dict]:
    raise KeyError("a bug, not a bad input")


def test_other_errors_stop_packing():
    with pytest.raises(KeyError, match="a bug"):
        list(parallel_samples(fail, [1, 2, 3], processes=2, rejected=[]))
    assert list(parallel_map(abs, [-3, 2, -1], processes=2)) == [3, 2, 1]
