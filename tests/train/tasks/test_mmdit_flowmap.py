"""The flow-map MMDiT task (``task: mmdit_flowmap``): teachers and settings refused before training, a
map that starts as its teacher, a data-free LSD run on 2 processes (ZeRO-2) that resumes exactly
and samples in one jump, and PSD under ZeRO-3 and pipeline stages."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from flowmill.cli import main as flowmill_main
from flowmill.errors import UsageError
from flowmill.run_dir import RunDir
from flowmill.train.config import load_config
from flowmill.train.distributed import DistEnv
from flowmill.train.sample import load_task_and_model
from flowmill.train.tasks.base import PriorBatches
from flowmill.train.tasks.mmdit_flowmap import FlowMapTask
from tests.helpers import TINY_CONFIG, fake_run, flowmill_ok, read_jsonl, rewound_copy, tiny_overrides

CPU = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def flowmap_config(digits_dir, run_dir, **extra):
    return load_config(TINY_CONFIG, tiny_overrides(digits_dir, run_dir, **{"task": "mmdit_flowmap", **extra}))


@pytest.mark.parametrize("overrides, message", [
    ({"distill.objective": "esd"}, "distill.objective: 'esd' is not one of lsd, psd"),
    ({"parallel.zero_stage": 3}, "parallel.zero_stage: LSD's forward-mode derivative .* ZeRO-3"),
    ({"parallel.pipeline_stages": 2}, "parallel.pipeline_stages: LSD differentiates the network in its end time"),
    ({"distill.noise_start_share": 0.8}, r"distill.noise_start_share: must be in \[0, 1 - distill.diagonal_share\]"),
    ({"distill.data_free": "true"}, "distill.data_free: data-free states come from a teacher's flow"),
    ({"distill.cfg_scale": 3.0}, "distill.cfg_scale: guidance is distilled from a teacher's guided velocity"),
    ({"distill.guidance": "raag", "distill.cfg_scale": 0.5}, "distill.guidance: RAAG's w_max must be"),
    ({"distill.diagonal_share": 1.0}, r"distill.diagonal_share: must be in \[0, 1\)"),
    ({"model.flow_map": "false"}, "model.flow_map: task mmdit_flowmap trains flow maps"),
    ({"sample.sampler": "heun"}, "sample.sampler: a flow map jumps"),
])
def test_bad_settings_are_refused_naming_the_key(digits_dir, tmp_path, overrides, message):
    with pytest.raises(UsageError, match=message):
        flowmap_config(digits_dir, tmp_path / "run", **overrides)


def test_psd_under_zero3_and_a_velocity_task_with_an_end_time(digits_dir, tmp_path):
    assert flowmap_config(digits_dir, tmp_path / "run", **{"distill.objective": "psd", "parallel.zero_stage": 3})
    with pytest.raises(UsageError, match="model.flow_map: task mmdit trains velocity models; flow maps train with task: mmdit_flowmap"):
        load_config(TINY_CONFIG, tiny_overrides(digits_dir, tmp_path / "run", **{"model.flow_map": "true"}))


def test_a_teacher_of_another_task_or_shape_is_refused(finished_run, digits_dir, tmp_path):
    other = fake_run(tmp_path / "fmlm", "fmlm", "flow_lm")
    cfg = flowmap_config(digits_dir, tmp_path / "a", **{"distill.teacher": other})
    with pytest.raises(UsageError, match="distill.teacher: .* is a fmlm run; a flow map distils a velocity MMDiT"):
        FlowMapTask(cfg, CPU, RunDir(tmp_path / "a"))
    cfg = flowmap_config(digits_dir, tmp_path / "b", **{"distill.teacher": finished_run, "model.depth": 3})
    with pytest.raises(UsageError, match="distill.teacher: .*'s model differs from model.* .*depth: 3 vs 2"):
        FlowMapTask(cfg, CPU, RunDir(tmp_path / "b"))
    cfg = flowmap_config(digits_dir, tmp_path / "c", **{"distill.teacher": finished_run, "text.depth": 2})
    with pytest.raises(UsageError, match="distill.teacher: .*'s text encoder differs from text.* .*text.depth: 2 vs 1"):
        FlowMapTask(cfg, CPU, RunDir(tmp_path / "c"))


def test_the_map_starts_as_its_teacher_and_keeps_the_teachers_text_encoder(finished_run, digits_dir, tmp_path):
    (tmp_path / "run").mkdir()
    cfg = flowmap_config(digits_dir, tmp_path / "run", **{"distill.teacher": finished_run, "text.seed": 5})
    with pytest.raises(UsageError, match="text.seed: 5 vs 0"):
        FlowMapTask(cfg, CPU, RunDir(tmp_path / "run"))
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, seed=0))
    task = FlowMapTask(cfg, CPU, RunDir(tmp_path / "run"))
    teacher_task, teacher, _ = load_task_and_model(finished_run)
    assert task.text_encoder_sha256() == teacher_task.text_encoder_sha256()
    flow_map = task.build_model().eval()
    txt, vec = task.prompts(["a handwritten digit three"] * 2)
    img, t = torch.randn(2, 1, 32, 32), torch.tensor([0.9, 0.4])
    with torch.no_grad():
        assert torch.equal(flow_map(img, t, txt, vec, 0.5 * t), teacher(img, t, txt, vec))


def test_prior_batches_continue_from_their_state():
    batches = PriorBatches(replica=1, batch_size=3)
    first = iter(batches)
    next(first)
    state = batches.state_dict()
    expected = next(first)["__key__"]
    again = PriorBatches(replica=1, batch_size=3)
    again.load_state_dict(state)
    assert next(iter(again))["__key__"] == expected == ["prior-1-1-0", "prior-1-1-1", "prior-1-1-2"]
    assert again.stats == {"delivered": 6, "skipped": 0}


@pytest.mark.slow
def test_data_free_lsd_on_two_processes_resumes_exactly_and_samples_in_one_jump(finished_run, tmp_path, capsys):
    """4 steps straight vs resumed from its checkpoint of step 2, ZeRO-2 on 2 gloo processes, no dataset
    (data.path missing)."""
    common = {"task": "mmdit_flowmap", "distill.teacher": finished_run, "distill.data_free": "true", "distill.flow_steps": 2,
              "distill.cfg_scale": 2.0, "parallel.zero_stage": 2, "trainer.max_steps": 4, "optim.decay_steps": 4,
              "checkpoint.every_steps": 2, "eval.num_samples": 4, "sample.steps": 1}
    missing = tmp_path / "no-data"
    flowmill_ok("launch", "local", "--nproc", "2", str(TINY_CONFIG),
                *tiny_overrides(missing, tmp_path / "straight", **common), cwd=tmp_path)
    flowmill_ok("resume", str(rewound_copy(tmp_path / "straight", 2, tmp_path / "stopped")), cwd=tmp_path)
    straight = read_jsonl(tmp_path / "straight" / "logs" / "metrics.jsonl")
    resumed = read_jsonl(tmp_path / "stopped" / "logs" / "metrics.jsonl")
    assert [r["train/loss"] for r in resumed] == [r["train/loss"] for r in straight] and len(straight) == 4
    assert resumed[-1]["val/map_error_1"] == straight[-1]["val/map_error_1"]
    assert (tmp_path / "straight" / "samples" / "grid-00000004.png").is_file()
    out = tmp_path / "one-jump"
    assert flowmill_main(["sample", str(tmp_path / "straight"), "--steps", "1", "--prompt", "a handwritten digit three",
                          "--num-samples", "2", "--out", str(out)]) == 0
    assert [r["prompt"] for r in read_jsonl(out / "samples.jsonl")] == ["a handwritten digit three"] * 2
    capsys.readouterr()
    assert flowmill_main(["sample", str(tmp_path / "straight"), "--steps", "0", "--prompt", "x", "--out", str(out)]) == 2
    assert "--steps: must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.slow
def test_psd_trains_under_zero3_and_pipeline_stages(finished_run, digits_dir, tmp_path):
    """PSD needs no forward-mode pass, so it keeps ZeRO-3 and pipeline stages (which LSD cannot have). With
    two stages, the half jumps of its targets run through the whole pipeline: the losses are one process's."""
    common = {"task": "mmdit_flowmap", "distill.teacher": finished_run, "distill.objective": "psd",
              "trainer.max_steps": 2, "trainer.grad_accum_steps": 2, "checkpoint.every_steps": 2, "eval.num_samples": 4,
              "sample.steps": 1}
    runs = {"one": {}, "zero3": {"parallel.zero_stage": 3}, "piped": {"parallel.pipeline_stages": 2, "parallel.zero_stage": 1}}
    for name, extra in runs.items():
        launch = ("train",) if name == "one" else ("launch", "local", "--nproc", "2")
        flowmill_ok(*launch, str(TINY_CONFIG), *tiny_overrides(digits_dir, tmp_path / name, **common, **extra), cwd=tmp_path)
        rows = read_jsonl(tmp_path / name / "logs" / "metrics.jsonl")
        assert [row["step"] for row in rows] == [1, 2] and all(math.isfinite(row["train/loss"]) for row in rows)
        assert RunDir(tmp_path / name).info()["status"] == "finished"
    one, piped = (read_jsonl(tmp_path / name / "logs" / "metrics.jsonl") for name in ("one", "piped"))
    assert [row["train/loss"] for row in piped] == pytest.approx([row["train/loss"] for row in one], abs=1e-5)
