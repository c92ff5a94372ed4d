"""The FLM task end to end through the CLI: train, metrics, text samples, exact resume, `flowmill sample`,
ZeRO-3 and pipeline stages on 2 processes, and the inputs refused before training."""

from __future__ import annotations

import json
import math

import pytest
import torch

from flowmill.cli import main as flowmill_main
from flowmill.data.text_tokenizer import TextTokenizer, train_text_tokenizer
from flowmill.errors import UsageError
from flowmill.run_dir import RunDir
from flowmill.train.config import load_config
from flowmill.train.distributed import DistEnv
from flowmill.train.tasks.flm import FLMTask
from tests.helpers import flowmill_ok, read_jsonl
from tests.text_helpers import FLM_TINY, SEQ_LEN, SIX_STEPS, flm_model_overrides, flm_overrides

pytestmark = pytest.mark.slow

CPU = DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def test_flm_trains_with_validation_metrics_and_text_samples(flm_run, text):
    records = {r["step"]: r for r in read_jsonl(flm_run / "logs" / "metrics.jsonl")}
    assert sorted(records) == list(range(1, 7))
    for step in (3, 6):
        metrics = records[step]
        assert {"val/ce_tau0.25", "val/ce_tau0.5", "val/ce_tau0.75", "sample/entropy", "sample/gen_ppl"} <= set(metrics)
        assert metrics["val/ce"] == pytest.approx((metrics["val/ce_tau0.25"] + metrics["val/ce_tau0.5"] + metrics["val/ce_tau0.75"]) / 3)
        assert 0 < metrics["sample/entropy"] <= math.log(SEQ_LEN) and metrics["sample/gen_ppl"] > 1
    # A fresh FLM predicts uniform logits (zero head): the loss starts at log V and moves down.
    assert records[1]["train/loss"] == pytest.approx(math.log(text.vocab_size), abs=0.02)
    assert records[6]["val/ce_tau0.25"] < records[6]["val/ce_tau0.75"] < math.log(text.vocab_size)
    samples = (flm_run / "samples" / "text-00000006.txt").read_text()
    assert samples.count("=== sample") == 4
    assert (flm_run / "text_tokenizer.model").read_bytes() == text.tokenizer.read_bytes()

    from mlflow.tracking import MlflowClient

    info = json.loads((flm_run / "run.json").read_text())
    assert info["status"] == "finished"
    client = MlflowClient(info["tracking_uri"])
    assert {a.path for a in client.list_artifacts(info["run_id"], "samples")} == {"samples/text-00000003.txt", "samples/text-00000006.txt"}
    assert [m.step for m in client.get_metric_history(info["run_id"], "sample/gen_ppl")] == [3, 6]


def test_flm_resume_is_exact(flm_run, text, judges, tmp_path):
    overrides = {**SIX_STEPS, **flm_model_overrides(text), "judge.cache_dir": judges, "trainer.max_steps": 3}
    flowmill_ok("train", str(FLM_TINY), *flm_overrides(text, tmp_path / "part", **overrides), cwd=tmp_path)
    flowmill_ok("resume", str(tmp_path / "part"), "trainer.max_steps=6", cwd=tmp_path)
    full = {r["step"]: r for r in read_jsonl(flm_run / "logs" / "metrics.jsonl")}
    part = {r["step"]: r for r in read_jsonl(tmp_path / "part" / "logs" / "metrics.jsonl")}
    assert sorted(part) == list(range(1, 7))
    for step in range(1, 7):
        assert part[step]["train/loss"] == pytest.approx(full[step]["train/loss"], abs=1e-6), step
    assert part[6]["val/ce"] == pytest.approx(full[6]["val/ce"], abs=1e-6)


def test_sample_writes_text_jsonl(flm_run, tmp_path, capsys):
    out = tmp_path / "deep" / "samples.jsonl"
    common = ["sample", str(flm_run), "--steps", "3", "--num-samples", "5"]
    args = [*common, "--seed", "2", "--out"]
    assert flowmill_main([*args, str(out)]) == 0
    lines = read_jsonl(out)
    assert len(lines) == 5 and all(set(line) == {"text"} and line["text"] for line in lines)
    printed = capsys.readouterr().out
    assert "--- sample 0 ---" in printed and lines[0]["text"] in printed and "wrote 5 samples" in printed
    assert flowmill_main([*args, str(tmp_path / "again.jsonl")]) == 0
    assert read_jsonl(tmp_path / "again.jsonl") == lines  # same seed, same samples
    assert flowmill_main([*common, "--seed", "3", "--out", str(tmp_path / "other.jsonl")]) == 0
    assert read_jsonl(tmp_path / "other.jsonl") != lines
    assert flowmill_main([*args, str(tmp_path)]) == 2  # a folder is for images
    assert flowmill_main([*args, str(tmp_path / "p.jsonl"), "--prompt", "hi"]) == 2
    assert ".jsonl file" in capsys.readouterr().err


def test_flm_zero3_on_two_processes(text, judges, tmp_path):
    run = tmp_path / "run"
    overrides = {**flm_model_overrides(text), "judge.cache_dir": judges, "trainer.max_steps": 3, "parallel.zero_stage": 3}
    flowmill_ok("launch", "local", "--nproc", "2", str(FLM_TINY), *flm_overrides(text, run, **overrides), cwd=tmp_path)
    records = read_jsonl(run / "logs" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["train/loss"] == pytest.approx(math.log(text.vocab_size), abs=0.02)
    assert math.isfinite(records[-1]["val/ce"]) and records[-1]["val/ce"] < math.log(text.vocab_size) + 0.01
    assert json.loads((run / "checkpoints" / "step-00000003" / "flowmill.json").read_text())["world_size"] == 2


def test_flm_pipeline_stages_match_the_plain_model(flm_run, text, judges, tmp_path):
    """Two pipeline stages on two processes train the plain run's losses (fp32) and evaluate its EMA."""
    run = tmp_path / "piped"
    overrides = {**SIX_STEPS, **flm_model_overrides(text), "judge.cache_dir": judges, "parallel.pipeline_stages": 2}
    flowmill_ok("launch", "local", "--nproc", "2", str(FLM_TINY), *flm_overrides(text, run, **overrides), cwd=tmp_path)
    plain, piped = read_jsonl(flm_run / "logs" / "metrics.jsonl"), read_jsonl(run / "logs" / "metrics.jsonl")
    assert [r["step"] for r in piped] == [r["step"] for r in plain] == list(range(1, 7))
    assert max(abs(a["train/loss"] - b["train/loss"]) for a, b in zip(piped[:5], plain[:5])) <= 1e-5
    assert piped[-1]["val/ce"] == pytest.approx(plain[-1]["val/ce"], abs=1e-4)  # the stages' EMA, gathered


def test_bad_inputs_are_refused_before_training(text, tmp_path):
    def flm_task(**extra):
        cfg = load_config(FLM_TINY, flm_overrides(text, tmp_path / "run", **{**flm_model_overrides(text), **extra}))
        return FLMTask(cfg, CPU, RunDir(tmp_path / "run"))

    flm_task().decoder()  # the matching inputs pass
    with pytest.raises(UsageError, match=f"model.vocab_size: 100, but the tokenizer .* has {text.vocab_size} pieces"):
        flm_task(**{"model.vocab_size": 100})
    with pytest.raises(UsageError, match="data.path: .* sequences of 16 tokens, longer than the model's maximum model.seq_len=8"):
        flm_task(**{"model.seq_len": 8}).decoder()
    with pytest.raises(UsageError, match="eval.path: .* sequences of 16 tokens but model.seq_len=32"):
        flm_task(**{"model.seq_len": 32}).validation_tokens()
    # Another tokenizer: the data's ids would mean other pieces.
    reversed_text = (text.root / "corpus.txt").read_text()[::-1]
    foreign = train_text_tokenizer(reversed_text.splitlines(), tmp_path / "foreign", vocab_size=text.vocab_size, newlines=True)
    foreign_size = TextTokenizer.load(foreign).vocab_size
    with pytest.raises(UsageError, match="data.path: .* was packed with another tokenizer"):
        flm_task(**{"text.tokenizer": foreign, "model.vocab_size": foreign_size}).decoder()
    with pytest.raises(UsageError, match="text.tokenizer: .* does not exist"):
        flm_task(**{"text.tokenizer": tmp_path / "missing.model"})
    with pytest.raises(UsageError, match="model.learned_loss_weight: the loss weight is no pipeline stage"):
        load_config(FLM_TINY, flm_overrides(text, tmp_path / "run", **{"parallel.pipeline_stages": 2, "model.learned_loss_weight": True}))
