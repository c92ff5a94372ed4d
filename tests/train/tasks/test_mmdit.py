"""The MMDiT task: fine-tuning from a model folder (model.init_from), cached text embeddings
(text.cached), and `flowmill sample` of an image run (PNGs, grid, index; its sampler refusal), in
this process."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from flowmill.cli import main
from flowmill.data.encode import encode_dataset, load_encoder
from flowmill.data.loader import StreamingLoader
from flowmill.data.pack import PackOptions
from flowmill.errors import UsageError
from flowmill.models.samplers import RatioAwareGuidance
from flowmill.run_dir import RunDir
from flowmill.train.config import load_config
from flowmill.train.distributed import DistEnv
from flowmill.train.model_io import import_sd3, load_weights
from flowmill.train.sample import load_task_and_model
from flowmill.train.tasks.mmdit import MMDiTTask
from tests.helpers import TINY_CONFIG, tiny_overrides
from tests.sd3_helpers import random_sd3


@pytest.fixture
def sd3_folder(tmp_path):
    reference = random_sd3()
    reference.save_pretrained(tmp_path / "sd3")
    return reference, tmp_path / "sd3"


def tiny_task(digits_dir, run_dir, **overrides) -> MMDiTTask:
    run_dir.mkdir(exist_ok=True)
    cfg = load_config(TINY_CONFIG, tiny_overrides(digits_dir, run_dir, **overrides))
    return MMDiTTask(cfg, DistEnv(rank=0, local_rank=0, world_size=1, device=torch.device("cpu")), RunDir(run_dir))


def test_fine_tuning_starts_from_a_model_folder_of_the_same_architecture(sd3_folder, digits_dir, tmp_path):
    _, folder = sd3_folder
    import_sd3(folder, tmp_path / "model")
    _, _, weights = load_weights(tmp_path / "model")
    task = tiny_task(digits_dir, tmp_path / "run", **{"model.init_from": tmp_path / "model"})
    model = task.build_model()
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in weights.items())

    # A run that already has checkpoints (resume, sample) does not read the base folder again.
    (tmp_path / "run" / "latest").write_text("checkpoints/step-00000001\n")
    assert not torch.equal(task.build_model().final.linear.weight, weights["final.linear.weight"])

    mismatched = tiny_task(digits_dir, tmp_path / "run2", **{"model.init_from": tmp_path / "model", "model.depth": 3,
                                                            "model.head_dim": 8})
    with pytest.raises(UsageError, match=r"model.init_from: .*differs.*depth: 3 vs 2; head_dim: 8 vs 16"):
        mismatched.build_model()
    meta = json.loads((tmp_path / "model" / "flowmill_model.json").read_text())
    (tmp_path / "model" / "flowmill_model.json").write_text(json.dumps({**meta, "family": "flow_lm"}))
    with pytest.raises(UsageError, match="unknown model family 'flow_lm'; choose one of: mmdit"):
        task.__class__(task.cfg, task.env, RunDir(tmp_path / "run3")).build_model()


def test_cached_text_embeddings_are_the_encoders_output(finished_run, digits_dir, tmp_path):
    args = {"run_dir": str(finished_run)}
    encode_dataset(digits_dir, tmp_path / "cached", load_encoder("flowmill.train.encoders:text_encoder", args),
                   encoder_spec="flowmill.train.encoders:text_encoder", encoder_args=args, keep=("png", "txt"),
                   batch_size=256, options=PackOptions(progress=False))
    cached = tiny_task(digits_dir, tmp_path / "run", **{"text.cached": "true", "data.path": tmp_path / "cached"})
    loader = StreamingLoader(tmp_path / "cached", rank=0, world_size=1, batch_size=8, num_workers=0, seed=0,
                             decode=cached.decoder(), shuffle_buffer=0, resampled=False)
    batch = next(iter(loader))
    txt, vec = cached.text_inputs(batch, torch.device("cpu"))
    expected_txt, expected_vec = cached.prompts(batch["txt"])
    assert txt.shape == (8, 32, 32) and torch.allclose(txt, expected_txt, atol=1e-6) and torch.allclose(vec, expected_vec, atol=1e-6)
    (inputs_, target) = cached.inputs_and_target(batch, torch.Generator().manual_seed(0))
    assert inputs_[0].shape == target.shape == (8, 1, 32, 32)

    with pytest.raises(UsageError, match="text.cached: .* other text encoder weights"):
        tiny_task(digits_dir, tmp_path / "run2", **{"text.cached": "true", "data.path": tmp_path / "cached", "text.seed": 1})
    with pytest.raises(UsageError, match="text.cached: .* has no txt_emb.npy, vec_emb.npy fields"):
        tiny_task(digits_dir, tmp_path / "run3", **{"text.cached": "true"})


def test_sample_writes_pngs_grid_and_index(finished_run, tmp_path, capsys):
    out = tmp_path / "out"
    prompts = ["a handwritten digit three", "a handwritten digit seven"]
    code = main([
        "sample", str(finished_run), "--prompt", prompts[0], "--prompt", prompts[1],
        "--num-samples", "3", "--steps", "2", "--cfg", "2.0", "--seed", "1", "--out", str(out),
    ])
    assert code == 0, capsys.readouterr().err[-3000:]
    lines = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [line["prompt"] for line in lines] == [prompts[0]] * 3 + [prompts[1]] * 3
    for line in lines:
        image = Image.open(out / line["file"])
        assert image.size == (32, 32) and image.mode == "L"
    grid = Image.open(out / "grid.png")
    assert grid.size == (2 * (3 * 34 + 2), 2 * (2 * 34 + 2))  # 3 per row, one row per prompt, upscaled 2x

    # Same seed, same images; a checkpoint folder works as the source too.
    again = tmp_path / "again"
    checkpoint = finished_run / "checkpoints" / "step-00000004"
    code = main([
        "sample", str(checkpoint), "--prompt", prompts[0], "--prompt", prompts[1],
        "--num-samples", "3", "--steps", "2", "--cfg", "2.0", "--seed", "1", "--out", str(again),
    ])
    assert code == 0, capsys.readouterr().err[-3000:]
    assert np.array_equal(np.asarray(Image.open(again / "grid.png")), np.asarray(grid))


def test_sample_with_raag_guidance(finished_run, tmp_path, capsys):
    out = tmp_path / "raag"
    code = main(["sample", str(finished_run), "--prompt", "a handwritten digit three", "--num-samples", "2", "--steps", "2",
                 "--sampler", "heun", "--guidance", "raag", "--cfg", "4", "--raag-alpha", "2", "--out", str(out)])
    assert code == 0, capsys.readouterr().err[-3000:]
    assert [json.loads(line)["file"] for line in (out / "samples.jsonl").read_text().splitlines()] == ["000-000.png", "000-001.png"]
    assert Image.open(out / "000-001.png").size == (32, 32)

    # RAAG with alpha 0 is constant CFG at w_max; with alpha > 0 its scale follows the ratio.
    task, model, _ = load_task_and_model(finished_run)
    prompts = ["a handwritten digit three", "a handwritten digit seven"]
    constant = task.generate(model, prompts, 2, 2, 4.0, "euler", 0)
    assert torch.equal(task.generate(model, prompts, 2, 2, RatioAwareGuidance(4.0, 0.0), "euler", 0), constant)
    assert not torch.equal(task.generate(model, prompts, 2, 2, RatioAwareGuidance(4.0, 2.0), "euler", 0), constant)


def test_log_samples_follow_the_sample_section_guidance(finished_run, tmp_path, monkeypatch):
    task, model, _ = load_task_and_model(finished_run)
    task.cfg = dataclasses.replace(task.cfg, sample=dataclasses.replace(task.cfg.sample, guidance="raag", cfg_scale=4.0,
                                                                        raag_alpha=2.0))
    used = []
    generate = MMDiTTask.generate
    monkeypatch.setattr(MMDiTTask, "generate", lambda self, *args, **kwargs: used.append(args[4]) or generate(self, *args, **kwargs))
    [grid] = task.log_samples(model, step=4, out_dir=tmp_path)
    assert used == [RatioAwareGuidance(w_max=4.0, alpha=2.0)] and grid.is_file()


def test_unknown_sampler_is_refused(finished_run, tmp_path, capsys):
    code = main(["sample", str(finished_run), "--prompt", "x", "--sampler", "eulr", "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "eulr" in err and "euler" in err
