"""Config loading: typed sections, overrides, refusals that name the key."""

from __future__ import annotations

import pytest

from flowmill.train.config import load_config, validate
from tests.helpers import TINY_CONFIG, flowmill
from flowmill.errors import UsageError


def test_yaml_and_overrides_load_into_typed_sections():
    cfg = load_config(TINY_CONFIG, ["trainer.max_steps=7", "optim.lr=3e-4", "model.depth=3", "run.name=abc"])
    assert cfg.trainer.max_steps == 7 and cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.model.depth == 3 and cfg.run.name == "abc"
    from flowmill.models.mmdit import MMDiTConfig

    assert isinstance(cfg.model, MMDiTConfig)


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.dpeth=4", "model.dpeth"),
        ("trainer.max_steps=abc", "trainer.max_steps"),
        ("checkpoint.every_steps=0", "checkpoint.every_steps"),
        ("trainer.precision=fp8", "trainer.precision"),
        ("parallel.zero_stage=5", "parallel.zero_stage"),
        ("flow.timesteps=cosine", "flow.timesteps"),
        ("task=nope", "task"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(UsageError) as error:
        load_config(TINY_CONFIG, [override])
    assert str(error.value).startswith(key), str(error.value)


def test_pipeline_stages_must_divide_world_size():
    cfg = load_config(TINY_CONFIG, ["parallel.pipeline_stages=2"])
    validate(cfg, world_size=2)
    with pytest.raises(UsageError, match="parallel.pipeline_stages"):
        validate(cfg, world_size=3)


def test_zero_2_with_pipeline_refused():
    with pytest.raises(UsageError, match="parallel.zero_stage.*pipeline"):
        load_config(TINY_CONFIG, ["parallel.pipeline_stages=2", "parallel.zero_stage=2"])


def test_launch_refuses_before_any_worker_starts(tmp_path):
    result = flowmill("launch", "local", "--nproc", "3", str(TINY_CONFIG), "parallel.pipeline_stages=2", cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert "parallel.pipeline_stages" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_missing_config_file(tmp_path):
    result = flowmill("train", str(tmp_path / "nope.yaml"), cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert "nope.yaml does not exist" in result.stderr
