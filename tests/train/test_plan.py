"""What a job derives from its config and world size, without changing the config."""

from __future__ import annotations

import pytest

from flowmill.errors import UsageError
from flowmill.run_dir import RunDir
from flowmill.train.config import Config, ParallelConfig, TrainerConfig
from flowmill.train.plan import Plan


def plan(world_size: int, micro: int = 8, accum: int = 1, stages: int = 1) -> Plan:
    cfg = Config(trainer=TrainerConfig(micro_batch_size=micro, grad_accum_steps=accum),
                 parallel=ParallelConfig(pipeline_stages=stages))
    return Plan.of(cfg, RunDir("run"), world_size, resume=False)


def test_replicas_and_global_batch_count_pipeline_stages_once():
    two_stages = plan(world_size=4, micro=8, accum=2, stages=2)
    assert two_stages.data_parallel == 2 and two_stages.global_batch_size == 32
    assert [two_stages.data_rank(rank) for rank in range(4)] == [0, 0, 1, 1]


@pytest.mark.parametrize("world_size, micro, accum", [(1, 8, 2), (4, 4, 1), (3, 8, 1)])
def test_keeping_the_global_batch_on_another_world_size(world_size, micro, accum):
    kept = plan(world_size, micro=8).keeping_global_batch(16 if world_size != 3 else 24)
    assert (kept.micro_batch_size, kept.grad_accum_steps) == (micro, accum)
    assert kept.global_batch_size == (16 if world_size != 3 else 24)


def test_a_global_batch_that_cannot_be_split_is_refused():
    with pytest.raises(UsageError, match="trainer.micro_batch_size: the global batch 10 cannot be split over 4 replicas"):
        plan(world_size=4).keeping_global_batch(10)


def test_derived_values_are_logged_as_derived_params():
    params = plan(world_size=2, micro=4).keeping_global_batch(16).params()
    assert params["derived.micro_batch_size"] == "4" and params["derived.grad_accum_steps"] == "2"
    assert params["derived.global_batch_size"] == "16" and params["derived.world_size"] == "2"
