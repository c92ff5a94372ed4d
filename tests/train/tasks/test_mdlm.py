"""The MDLM task in one process, without DeepSpeed: data checks, loss, validation metrics, samples and
`flowmill sample`'s JSON lines, and the inputs refused before training (the objective itself:
tests/train/test_mdlm_objective.py)."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from flowmill.errors import UsageError
from flowmill.run_dir import RunDir
from flowmill.train.config import load_config
from flowmill.train.distributed import DistEnv
from flowmill.train.tasks.fmlm import FMLMTask
from flowmill.train.tasks.mdlm import MDLMTask
from tests.helpers import fake_run, read_jsonl
from tests.text_helpers import FMLM_TINY, MDLM_TINY, SEQ_LEN, flm_model_overrides, flm_overrides

CPU = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def mdlm_config(text, run_dir, **extra):
    return load_config(MDLM_TINY, flm_overrides(text, run_dir, **{**flm_model_overrides(text), **extra}))


def test_mdlm_task_trains_validates_and_writes_text_samples(text, tmp_path, capsys):
    torch.manual_seed(0)
    (tmp_path / "run").mkdir()
    task = MDLMTask(mdlm_config(text, tmp_path / "run"), CPU, RunDir(tmp_path / "run"))
    task.prepare_run_dir()
    assert (tmp_path / "run" / "text_tokenizer.model").read_bytes() == text.tokenizer.read_bytes()
    task.decoder()  # data.path fits the model
    model = task.build_model()
    assert task.family == "masked_diffusion_lm" and model.mask_id == text.vocab_size
    batch = task.first_batch(str(text.train), 8)
    loss, metrics = task.loss(model, batch, torch.Generator().manual_seed(0))
    loss.backward()  # a fresh model predicts uniform logits: every masked token costs log V
    assert metrics["masked_ce"].item() == pytest.approx(math.log(text.vocab_size), abs=1e-4)
    assert any(param.grad is not None and param.grad.abs().sum() > 0 for param in model.parameters())

    model.eval()
    metrics = task.evaluate(model, step=1)
    clock = [0.25, 0.5, 0.75]
    assert metrics["val/ce"] == pytest.approx(sum(metrics[f"val/ce_tau{tau:g}"] for tau in clock) / 3)
    for tau in clock:  # a share tau masked, each at log V
        assert metrics[f"val/ce_tau{tau:g}"] == pytest.approx(tau * math.log(text.vocab_size), rel=0.15)
    assert metrics["val/elbo"] == pytest.approx(math.log(text.vocab_size), rel=0.05)
    assert 0 < metrics["sample/entropy"] <= math.log(SEQ_LEN) and "sample/gen_ppl" not in metrics  # no judge

    out = tmp_path / "samples.jsonl"
    args = argparse.Namespace(prompt=None, sampler="euler", out=str(out), num_samples=3, steps=4, seed=5)
    assert task.sample_command(model, tmp_path / "run", args) == 0
    lines = read_jsonl(out)
    assert len(lines) == 3 and all(set(line) == {"text"} and line["text"] for line in lines)
    assert "wrote 3 samples (4 steps, seed 5)" in capsys.readouterr().out
    assert torch.equal(task.generate(model, 3, 4, 5), task.generate(model, 3, 4, 5))


def test_bad_mdlm_inputs_are_refused_before_training(text, tmp_path):
    mdlm_config(text, tmp_path / "run", **{"model.mask_id": text.vocab_size})  # the id after the vocabulary is the mask's
    with pytest.raises(UsageError, match=f"model.mask_id: 3 collides with a token of the vocabulary \\(ids 0..{text.vocab_size - 1}\\)"):
        mdlm_config(text, tmp_path / "run", **{"model.mask_id": 3})
    with pytest.raises(UsageError, match="model.mask_id: 999 is not the id after the vocabulary"):
        mdlm_config(text, tmp_path / "run", **{"model.mask_id": 999})
    with pytest.raises(UsageError, match="parallel.pipeline_stages: mdlm trains without pipeline stages"):
        mdlm_config(text, tmp_path / "run", **{"parallel.pipeline_stages": 2})
    with pytest.raises(UsageError, match="model.flow_map: a masked-diffusion LM has no flow map"):
        mdlm_config(text, tmp_path / "run", **{"model.flow_map": True})
    with pytest.raises(UsageError, match="sample.sampler: mdlm samples with ancestral unmasking steps"):
        mdlm_config(text, tmp_path / "run", **{"sample.sampler": "heun"})

    mdlm_run = fake_run(tmp_path / "mdlm-run", "mdlm", "masked_diffusion_lm")
    cfg = load_config(FMLM_TINY, flm_overrides(text, tmp_path / "d", **{"distill.teacher": mdlm_run}))
    with pytest.raises(UsageError, match="distill.teacher: .* holds a masked_diffusion_lm model \\(task mdlm\\); FMLM distils a flow language model"):
        FMLMTask(cfg, CPU, RunDir(tmp_path / "d"))
