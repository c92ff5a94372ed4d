"""Config loading: typed sections, overrides, refusals that name the key."""

from __future__ import annotations

import dataclasses

import pytest

from flowmill.arguments import RAAG_ALPHA
from flowmill.cli import main
from flowmill.errors import UsageError
from flowmill.models.flow_lm import FLOW_LM_SIZES
from flowmill.models.mmdit import MMDIT_SIZES, MMDiTConfig
from flowmill.train.config import load_config, to_dict, validate
from flowmill.train.tasks.mmdit import MMDiTRunConfig
from tests.helpers import TINY_CONFIG


def test_yaml_and_overrides_load_into_typed_sections():
    cfg = load_config(TINY_CONFIG, ["trainer.max_steps=7", "optim.lr=3e-4", "model.depth=3", "run.name=abc"])
    assert cfg.trainer.max_steps == 7 and cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.model.depth == 3 and cfg.run.name == "abc"
    assert isinstance(cfg, MMDiTRunConfig) and isinstance(cfg.model, MMDiTConfig)


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
        ("parallel.timeout_min=0", "parallel.timeout_min"),
        ("ema.device=tpu", "ema.device"),
        ("trainer.log_every_steps=0", "trainer.log_every_steps"),
        ("sample.guidance=raga", "sample.guidance"),
        ("sample.raag_alpha=-1", "sample.raag_alpha"),
        ("sample.raag_alpha=nan", "sample.raag_alpha"),
        ("tracking.tags.a.b=x", "tracking.tags.a"),
        ("tracking.retry_after_s=-1", "tracking.retry_after_s"),
        ("data.retries=-1", "data.retries"),
        ("data.storage_options=s3", "data.storage_options"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(UsageError) as error:
        load_config(TINY_CONFIG, [override])
    assert str(error.value).startswith(key), str(error.value)


def test_raag_guidance_needs_a_scale_of_at_least_one():
    cfg = load_config(TINY_CONFIG, ["sample.guidance=raag", "sample.raag_alpha=0", "sample.cfg_scale=1"])
    assert (cfg.sample.guidance, cfg.sample.raag_alpha, cfg.sample.cfg_scale) == ("raag", 0.0, 1.0)
    assert load_config(TINY_CONFIG, ["sample.cfg_scale=0.5"]).sample.cfg_scale == 0.5  # constant CFG takes any scale
    with pytest.raises(UsageError, match=r"^sample.cfg_scale: with sample.guidance raag it is RAAG's w_max, which must be "
                                         r"a finite number >= 1, got 0.5$"):
        load_config(TINY_CONFIG, ["sample.guidance=raag", "sample.cfg_scale=0.5"])


def test_sample_guidance_defaults_to_constant_cfg_with_the_cli_default_raag_alpha():
    sample = load_config(TINY_CONFIG).sample
    assert (sample.guidance, sample.raag_alpha) == ("cfg", RAAG_ALPHA)


def test_pipeline_stages_must_divide_world_size():
    cfg = load_config(TINY_CONFIG, ["parallel.pipeline_stages=2"])
    validate(cfg, world_size=2)
    with pytest.raises(UsageError, match="parallel.pipeline_stages"):
        validate(cfg, world_size=3)


def test_zero_2_with_pipeline_refused():
    with pytest.raises(UsageError, match="parallel.zero_stage.*pipeline"):
        load_config(TINY_CONFIG, ["parallel.pipeline_stages=2", "parallel.zero_stage=2"])


def test_launch_refuses_before_any_worker_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["launch", "local", "--nproc", "3", str(TINY_CONFIG), "parallel.pipeline_stages=2"]) == 2
    assert "parallel.pipeline_stages" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.filterwarnings("ignore:Unable to enable fault handler")  # torch's @record on pytest's captured stderr
def test_missing_config_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml does not exist" in capsys.readouterr().err


def test_a_loaded_config_cannot_be_changed():
    cfg = load_config(TINY_CONFIG)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.trainer.micro_batch_size = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.run = None


def test_a_preset_size_gives_its_fields_and_single_fields_override_it(tmp_path):
    config = tmp_path / "flm.yaml"
    config.write_text("task: flm\nmodel:\n  size: paper-tiny\n  vocab_size: 64\n  seq_len: 32\n")
    cfg = load_config(config, ["model.depth=2"])
    preset = FLOW_LM_SIZES["paper-tiny"]
    assert (cfg.model.dim, cfg.model.num_heads) == (preset.dim, preset.num_heads)
    assert (cfg.model.depth, cfg.model.vocab_size, cfg.model.size) == (2, 64, "paper-tiny")
    # The saved config holds the expanded fields, so a resume builds the same model.
    assert load_config(None, [], base=to_dict(cfg)).model == cfg.model


def test_a_preset_named_by_override_and_an_unknown_one():
    tiny = MMDIT_SIZES["tiny"]
    cfg = load_config(TINY_CONFIG, ["model.size=tiny", "model.depth=3"])
    assert cfg.model.size == "tiny" and cfg.model.depth == 3
    assert cfg.model.head_dim == 16 == tiny.head_dim  # the file's own model fields still win over the preset
    with pytest.raises(UsageError, match="model.size: unknown size 'huge'; choose one of: tiny, small, sd3-medium"):
        load_config(TINY_CONFIG, ["model.size=huge"])
