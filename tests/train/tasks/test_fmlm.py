"""The FMLM task (flow-map distillation of an FLM run) end to end through the CLI: two-stage
distillation, one-step `flowmill sample`, and the teachers and settings refused before training."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flowmill.cli import main as flowmill_main
from flowmill.errors import UsageError
from flowmill.run_dir import Checkpoint, RunDir
from flowmill.train.config import check_data_source, load_config
from flowmill.train.distributed import DistEnv
from flowmill.train.tasks.fmlm import FMLMTask
from flowmill.weights import read_ema, weights_sha256
from tests.helpers import fake_run, flowmill, flowmill_ok, read_jsonl
from tests.text_helpers import FMLM_TINY, SIX_STEPS, flm_overrides

pytestmark = pytest.mark.slow

CPU = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def corrector_run(text, judges, flm_run, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corrector")
    overrides = {**SIX_STEPS, "judge.cache_dir": judges, "distill.teacher": flm_run}
    flowmill_ok("train", str(FMLM_TINY), *flm_overrides(text, root / "run", **overrides), cwd=root)
    return root / "run"


def test_fmlm_distills_in_two_stages(corrector_run, flm_run, text, judges, tmp_path):
    records = read_jsonl(corrector_run / "logs" / "metrics.jsonl")
    assert {"val/distill_error", "sample/entropy", "sample/gen_ppl"} <= set(records[-1])
    copied = load_file(corrector_run / "teacher" / "ema.safetensors")
    assert weights_sha256(copied) == weights_sha256(read_ema(Checkpoint(flm_run / "checkpoints" / "step-00000006")))

    student = tmp_path / "student"
    overrides = {
        **SIX_STEPS, "judge.cache_dir": judges, "distill.teacher": flm_run, "distill.stage": "student",
        "distill.corrector": corrector_run, "sample.steps": 2,
    }
    flowmill_ok("train", str(FMLM_TINY), *flm_overrides(text, student, **overrides), cwd=tmp_path)
    last = read_jsonl(student / "logs" / "metrics.jsonl")[-1]
    assert {"val/distill_error", "val/ce", "val/ce_tau0.5", "sample/gen_ppl"} <= set(last)
    assert last["val/ce"] < math.log(text.vocab_size)  # it starts as the teacher, not from scratch
    assert (student / "samples" / "text-00000006.txt").read_text().startswith("4 samples of 2 steps")
    out = tmp_path / "one-step.jsonl"
    assert flowmill_main(["sample", str(student), "--steps", "1", "--num-samples", "3", "--out", str(out)]) == 0
    assert len(read_jsonl(out)) == 3
    # A flow-map run is no teacher; an FLM run is no corrector.
    cfg = load_config(FMLM_TINY, flm_overrides(text, tmp_path / "x", **{"distill.teacher": corrector_run}))
    with pytest.raises(UsageError, match="distill.teacher: .* is a fmlm run \\(a flow map\\)"):
        FMLMTask(cfg, CPU, RunDir(tmp_path / "x"))
    cfg = load_config(FMLM_TINY, flm_overrides(text, tmp_path / "x", **{
        "distill.teacher": flm_run, "distill.stage": "student", "distill.corrector": flm_run}))
    with pytest.raises(UsageError, match="distill.corrector: .* is a flm run; it must be an fmlm run with distill.stage=corrector"):
        FMLMTask(cfg, CPU, RunDir(tmp_path / "x"))


def test_data_free_distillation_starts_on_the_teachers_flow_and_reads_no_data(flm_run, text, tmp_path):
    overrides = {"distill.teacher": flm_run, "distill.data_free": True, "distill.flow_steps": 2, "data.path": tmp_path / "none"}
    cfg = load_config(FMLM_TINY, flm_overrides(text, tmp_path / "d", **overrides))
    assert not FMLMTask.reads_data(cfg)
    check_data_source(cfg)  # data.path does not exist, and need not
    task = FMLMTask(cfg, CPU, RunDir(tmp_path / "d"))
    model = task.build_model()
    batch = next(iter(task.build_loader(0, 1, 4)))
    assert set(batch) == {"__key__"}
    loss, metrics = task.loss(model, batch, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and metrics["distill_error"] >= 0


def test_bad_inputs_are_refused_before_training(text, tmp_path):
    with pytest.raises(UsageError, match="distill.flow_steps: data-free states need at least 1 teacher step, got 0"):
        load_config(FMLM_TINY, flm_overrides(text, tmp_path / "run", **{
            "distill.teacher": "x", "distill.data_free": True, "distill.flow_steps": 0}))
    with pytest.raises(UsageError, match="parallel.pipeline_stages: fmlm trains without pipeline stages"):
        load_config(FMLM_TINY, flm_overrides(text, tmp_path / "run", **{"parallel.pipeline_stages": 2, "distill.teacher": "x"}))

    image_run = fake_run(tmp_path / "mmdit-run", "mmdit", "mmdit")
    cfg = load_config(FMLM_TINY, flm_overrides(text, tmp_path / "d", **{"distill.teacher": image_run}))
    with pytest.raises(UsageError, match="distill.teacher: .* holds a mmdit model \\(task mmdit\\); FMLM distils a flow language model"):
        FMLMTask(cfg, CPU, RunDir(tmp_path / "d"))
    with pytest.raises(UsageError, match="distill.teacher: give the FLM run"):
        load_config(FMLM_TINY, flm_overrides(text, tmp_path / "d"))
    with pytest.raises(UsageError, match="distill.corrector: the student stage needs"):
        load_config(FMLM_TINY, flm_overrides(text, tmp_path / "d", **{"distill.teacher": image_run, "distill.stage": "student"}))
    with pytest.raises(UsageError, match="distill.stage: 'students' is not one of corrector, student"):
        load_config(FMLM_TINY, flm_overrides(text, tmp_path / "d", **{"distill.teacher": image_run, "distill.stage": "students"}))


def test_a_bad_teacher_stops_the_cli_with_exit_code_2(text, tmp_path):
    image_run = fake_run(tmp_path / "mmdit-run", "mmdit", "mmdit")
    result = flowmill("train", str(FMLM_TINY), *flm_overrides(text, tmp_path / "d", **{"distill.teacher": image_run}), cwd=tmp_path)
    assert result.returncode == 2
    assert "flowmill: error: distill.teacher:" in result.stderr and "holds a mmdit model" in result.stderr
    assert not (tmp_path / "d" / "checkpoints" / "step-00000001").exists()
